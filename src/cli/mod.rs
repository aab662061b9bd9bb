//! The command line as library code the binary (`src/main.rs`) only
//! dispatches to: its flags ([`args`]), `inspect`'s typed report, `info`'s
//! table, `get`'s .npy files and `bench`'s load generator.
pub mod args;
pub mod info;
pub mod inspect;
pub mod loadgen;
pub mod npy;
