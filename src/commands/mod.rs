//! The bodies of the `flowgate` subcommands that do more than call one library function.
//! Each returns values and errors; `main.rs` parses the command line, calls them and prints.

pub mod campaign;
pub mod chat;
pub mod contacts_import;
pub mod templates_sync;
pub mod test;
