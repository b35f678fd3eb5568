//! flowgate: a WhatsApp chatbot automation engine. YAML flows and Rhai scripts answer
//! customers; every outgoing message passes a policy that knows WhatsApp's 24-hour window.
//!
//! `ARCHITECTURE.md` has the map of these modules and the invariants between them.

pub mod app;
pub mod campaign;
pub mod campaign_runner;
pub mod clock;
pub mod commands;
pub mod config;
pub mod contacts_import;
pub mod conversation;
pub mod diagnostic;
pub mod dispatch;
pub mod domain;
pub mod engine;
pub mod flow;
pub mod http;
pub mod inbound;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod operator;
pub mod outbox;
pub mod policy;
pub mod reload;
pub mod script;
pub mod splits;
pub mod state;
pub mod store;
pub mod templates;
pub mod whatsapp;
pub mod yaml;
