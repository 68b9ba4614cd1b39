//! Hex and base64 as the AgentMesh runtimes write them.
//!
//! Output is canonical (lowercase hex; base64 in the variant each field
//! uses). Input is lenient where the references are: base64 in the standard
//! or URL-safe alphabet, with or without padding.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// The input was not valid base64 or hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid base64")]
    /// Not valid base64 (either alphabet, padded or not).
    Base64,
    #[error("invalid hex")]
    /// Not valid hex.
    Hex,
}

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(false);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Standard alphabet with padding (relay frames).
pub fn b64_std(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// URL-safe alphabet without padding (registry bodies, Authorization header).
pub fn b64_url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes either alphabet, padded or not.
pub fn b64_decode(text: &str) -> Result<Vec<u8>, DecodeError> {
    let uses_url_alphabet = text.bytes().any(|b| b == b'-' || b == b'_');
    let engine = if uses_url_alphabet {
        &URL_SAFE_LENIENT
    } else {
        &STANDARD_LENIENT
    };
    engine.decode(text).map_err(|_| DecodeError::Base64)
}

/// Lowercase hex.
pub fn hex_encode(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Hex in either case.
pub fn hex_decode(text: &str) -> Result<Vec<u8>, DecodeError> {
    hex::decode(text).map_err(|_| DecodeError::Hex)
}

/// Hex of exactly `N` bytes.
pub fn hex_decode_array<const N: usize>(text: &str) -> Result<[u8; N], DecodeError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).map_err(|_| DecodeError::Hex)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_lenient_on_input() {
        let bytes = [0xfbu8, 0xff, 0x01, 0x02];
        for text in ["+/8BAg==", "+/8BAg", "-_8BAg==", "-_8BAg"] {
            assert_eq!(b64_decode(text).unwrap(), bytes, "{text}");
        }
        assert_eq!(b64_std(&bytes), "+/8BAg==");
        assert_eq!(b64_url(&bytes), "-_8BAg");
        assert_eq!(b64_decode("+/8BAg=").unwrap(), bytes);
        assert_eq!(b64_decode("-/8BAg"), Err(DecodeError::Base64), "mixed alphabets");
        assert_eq!(b64_decode("AB=C"), Err(DecodeError::Base64));
        assert_eq!(b64_decode("AB*C"), Err(DecodeError::Base64));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex_decode("ABcd").unwrap(), vec![0xab, 0xcd]);
        assert_eq!(hex_encode(&[0xab, 0xcd]), "abcd");
        assert_eq!(hex_decode("abc"), Err(DecodeError::Hex));
        assert_eq!(hex_decode_array::<2>("abcdef"), Err(DecodeError::Hex));
    }
}
