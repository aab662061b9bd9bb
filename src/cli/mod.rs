//! What the command-line tools do besides serving, as library code the
//! binary (`src/main.rs`) only dispatches to: `inspect`'s typed report,
//! `info`'s table, `get`'s .npy files and `bench`'s load generator.
pub mod info;
pub mod inspect;
pub mod loadgen;
pub mod npy;
