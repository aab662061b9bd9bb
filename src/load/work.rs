//! The loader's CPU budget: how many steps reading one input may take.
//!
//! The memory limits (`pickle::MAX_SLOTS`, `--max-dataset-bytes`, ...) bound what the
//! reader keeps, not what it does: a few kilobytes of gzip can hold a pickle
//! that makes a careless reader repeat work on one shared object millions of
//! times. So the pickle reader and the layout pass also count their steps,
//! and a load stops, with an error naming the file and the offset it had
//! reached, once the count passes a budget proportional to the input's size.
//!
//! A step is one unit of a loop whose length the input controls: one opcode,
//! one value moved into or out of a container, one byte of text decoded, one
//! dimension of a shape read or compared, one array element byte-swapped,
//! transposed or stacked.
use crate::load::error::At;

/// Steps allowed per byte of (decompressed) input.
///
/// Why 64: every step of a valid file consumes input or touches a payload
/// element, so a real dataset needs few steps per byte. The reader spends at
/// most about 4 per byte (an opcode; a value pushed by a one-byte opcode,
/// popped from its MARK and stored in a container; a byte of text scanned
/// and decoded). The layout pass spends at most about 7: each payload element
/// byte-swapped once, and transposed or stacked once per set that uses it (a
/// pair shared by all three sets counts three times). So a valid file stays
/// under 16 per byte, and most need far less: payloads already little-endian
/// in C order are served where they lie, untouched, so the bundled 15 MB
/// MNIST sample takes a few hundred steps in all (see `tests/fuzz_loader.rs`).
/// 64 leaves four times the worst valid case, while a budget spent in full
/// is still only a fraction of a second of CPU per MiB of input (a step is a
/// few nanoseconds of work).
pub const WORK_PER_BYTE: u64 = 64;

/// Steps allowed whatever the input's size, so that tiny inputs (test files,
/// a pickle of a few hundred bytes) never come near the limit. A million
/// steps take a few milliseconds.
pub const WORK_FLOOR: u64 = 1 << 20;

/// A step counter with a limit.
#[derive(Debug, Clone)]
pub struct Work {
    used: u64,
    limit: u64,
}

impl Work {
    /// The budget for an input of `len` bytes:
    /// `WORK_PER_BYTE * len + WORK_FLOOR`.
    pub fn for_input(len: usize) -> Self {
        Self::with_limit(
            WORK_PER_BYTE
                .saturating_mul(len as u64)
                .saturating_add(WORK_FLOOR),
        )
    }

    /// A budget of exactly `limit` steps (tests).
    pub fn with_limit(limit: u64) -> Self {
        Self { used: 0, limit }
    }

    /// Counts `steps` done at byte `at`; fails once the budget is exceeded.
    pub fn charge(&mut self, steps: usize, at: usize) -> Result<(), At> {
        self.used = self.used.saturating_add(steps as u64);
        if self.used > self.limit {
            return Err(At::new(
                at,
                format!(
                    "work budget of {} steps exceeded (the budget grows with the input's size, {WORK_PER_BYTE} per byte, and a real dataset needs a small fraction of it): this input makes the reader repeat work on shared objects",
                    self.limit
                ),
            ));
        }
        Ok(())
    }

    /// Steps counted so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether a charge has failed (the error a reader returned is then the
    /// budget's).
    pub fn exceeded(&self) -> bool {
        self.used > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grows_with_input_and_stops_past_its_limit() {
        assert_eq!(Work::for_input(0).limit(), WORK_FLOOR);
        assert_eq!(Work::for_input(1000).limit(), 64_000 + WORK_FLOOR);
        let mut w = Work::with_limit(10);
        w.charge(10, 3).unwrap();
        assert!(!w.exceeded());
        let e = w.charge(1, 7).unwrap_err();
        assert_eq!(e.offset, 7);
        assert!(
            e.what.contains("work budget of 10 steps exceeded"),
            "{}",
            e.what
        );
        assert!(w.exceeded());
    }
}
