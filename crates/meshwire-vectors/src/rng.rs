//! RNGs that replay recorded randomness.

use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;

/// `sha256(utf8(label))`, the schema's deterministic input.
pub fn label_bytes(label: &str) -> [u8; 32] {
    Sha256::digest(label.as_bytes()).into()
}

/// Yields a fixed list of byte strings, one per `fill_bytes` call, and
/// records any call that does not match the script (wrong length, too many
/// calls). Tests must call [`ScriptedRng::finish`] to see those.
#[derive(Debug, Default)]
pub struct ScriptedRng {
    queue: VecDeque<Vec<u8>>,
    error: Option<String>,
}

impl ScriptedRng {
    /// A generator that yields `values` in order, one per `fill_bytes` call.
    pub fn new<I: IntoIterator<Item = Vec<u8>>>(values: I) -> Self {
        Self {
            queue: values.into_iter().collect(),
            error: None,
        }
    }

    /// Ok when every value was drawn, in the right sizes, and no more.
    pub fn finish(&self) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if !self.queue.is_empty() {
            return Err(format!(
                "{} recorded random value(s) were never drawn",
                self.queue.len()
            ));
        }
        Ok(())
    }

    fn fail(&mut self, message: String) {
        self.error.get_or_insert(message);
    }
}

impl RngCore for ScriptedRng {
    fn next_u32(&mut self) -> u32 {
        self.fail("unexpected next_u32 draw".into());
        0
    }

    fn next_u64(&mut self) -> u64 {
        self.fail("unexpected next_u64 draw".into());
        0
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        match self.queue.pop_front() {
            Some(value) if value.len() == dest.len() => dest.copy_from_slice(&value),
            Some(value) => {
                self.fail(format!(
                    "drew {} random bytes where {} were recorded",
                    dest.len(),
                    value.len()
                ));
                dest.fill(0);
            }
            None => {
                self.fail(format!("drew {} random bytes beyond the recorded ones", dest.len()));
                dest.fill(0);
            }
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for ScriptedRng {}

/// Draws a party's labelled inputs in order: 32-byte draws are
/// `<prefix>/ratchet-K`, 12-byte draws `<prefix>/nonce-K` (first 12 bytes).
#[derive(Debug)]
pub struct LabelRng {
    prefix: String,
    next_ratchet: u32,
    next_nonce: u32,
    /// Every 32-byte value drawn since the last [`LabelRng::take_ratchet_draws`].
    ratchet_draws: Vec<[u8; 32]>,
    last_nonce: Option<[u8; 12]>,
    error: Option<String>,
}

impl LabelRng {
    /// A generator for the party whose labels start with `prefix`
    /// (`agentmesh-golden/<case>/<party>`), with both counters at 0.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            next_ratchet: 0,
            next_nonce: 0,
            ratchet_draws: Vec::new(),
            last_nonce: None,
            error: None,
        }
    }

    /// Returns the 32-byte (ratchet private key) values drawn since the
    /// last call, in draw order, and forgets them.
    pub fn take_ratchet_draws(&mut self) -> Vec<[u8; 32]> {
        std::mem::take(&mut self.ratchet_draws)
    }

    /// Returns the last 12-byte nonce drawn, if any since the last call,
    /// and forgets it.
    pub fn take_nonce(&mut self) -> Option<[u8; 12]> {
        self.last_nonce.take()
    }

    /// The first unexpected draw (`next_u32`, `next_u64`, or a length
    /// other than 32 or 12 bytes, which was filled with zeros), if any.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

impl RngCore for LabelRng {
    fn next_u32(&mut self) -> u32 {
        self.error.get_or_insert_with(|| "unexpected next_u32 draw".into());
        0
    }

    fn next_u64(&mut self) -> u64 {
        self.error.get_or_insert_with(|| "unexpected next_u64 draw".into());
        0
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        match dest.len() {
            32 => {
                let value = label_bytes(&format!("{}/ratchet-{}", self.prefix, self.next_ratchet));
                self.next_ratchet += 1;
                self.ratchet_draws.push(value);
                dest.copy_from_slice(&value);
            }
            12 => {
                let full = label_bytes(&format!("{}/nonce-{}", self.prefix, self.next_nonce));
                self.next_nonce += 1;
                let mut nonce = [0u8; 12];
                nonce.copy_from_slice(full.get(..12).unwrap_or(&[0u8; 12]));
                self.last_nonce = Some(nonce);
                dest.copy_from_slice(&nonce);
            }
            n => {
                self.error
                    .get_or_insert_with(|| format!("unexpected draw of {n} bytes"));
                dest.fill(0);
            }
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for LabelRng {}
