//! The randomness of the low-level API: the operating system's generator,
//! read 4 KiB at a time.
//!
//! Every encrypt draws a 12-byte nonce; one `getrandom` call per nonce costs
//! about a tenth of a 1 KiB encrypt+decrypt. [`BufferedOsRng`] hands out
//! bytes from a per-thread buffer filled by `getrandom`, erases each byte as
//! it is handed out, and throws the buffer away in the child after a
//! `fork()` (a `pthread_atfork` handler bumps a generation counter), so a
//! forked process never reuses its parent's bytes.

use rand_core::{CryptoRng, OsRng, RngCore};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use zeroize::Zeroize;

const BUFFER: usize = 4096;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static FORK_HANDLER: Once = Once::new();

#[cfg(unix)]
extern "C" fn forked_child() {
    GENERATION.fetch_add(1, Ordering::SeqCst);
}

fn install_fork_handler() {
    FORK_HANDLER.call_once(|| {
        #[cfg(unix)]
        // SAFETY: registers a handler that only increments an atomic, which
        // is async-signal-safe and valid in a freshly forked child.
        unsafe {
            libc::pthread_atfork(None, None, Some(forked_child));
        }
    });
}

struct Buffer {
    bytes: [u8; BUFFER],
    /// Bytes before `pos` were handed out (and erased).
    pos: usize,
    generation: u64,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

thread_local! {
    static LOCAL: RefCell<Buffer> = const {
        RefCell::new(Buffer { bytes: [0; BUFFER], pos: BUFFER, generation: u64::MAX })
    };
}

/// `OsRng`, buffered per thread and fork-safe; a `CryptoRng`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BufferedOsRng;

impl BufferedOsRng {
    fn fill(dest: &mut [u8]) -> Result<(), rand_core::Error> {
        if dest.len() > BUFFER / 4 {
            return OsRng.try_fill_bytes(dest);
        }
        install_fork_handler();
        LOCAL.with(|cell| {
            let Ok(mut buffer) = cell.try_borrow_mut() else {
                return OsRng.try_fill_bytes(dest);
            };
            let generation = GENERATION.load(Ordering::SeqCst);
            if buffer.generation != generation {
                buffer.bytes.zeroize();
                buffer.pos = BUFFER;
                buffer.generation = generation;
            }
            let mut done = 0;
            while done < dest.len() {
                if buffer.pos == BUFFER {
                    OsRng.try_fill_bytes(&mut buffer.bytes)?;
                    buffer.pos = 0;
                }
                let take = (dest.len() - done).min(BUFFER - buffer.pos);
                let start = buffer.pos;
                let (Some(out), Some(src)) = (
                    dest.get_mut(done..done + take),
                    buffer.bytes.get_mut(start..start + take),
                ) else {
                    return OsRng.try_fill_bytes(dest);
                };
                out.copy_from_slice(src);
                src.zeroize();
                buffer.pos += take;
                done += take;
            }
            Ok(())
        })
    }
}

impl RngCore for BufferedOsRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        if Self::fill(dest).is_err() {
            // As OsRng itself: no randomness is not a recoverable state.
            OsRng.fill_bytes(dest);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        Self::fill(dest)
    }
}

impl CryptoRng for BufferedOsRng {}
