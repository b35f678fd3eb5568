//! The integration tests, as one test binary: each module is one area, `support` holds what
//! they share. One binary links once (a binary per file linked eleven times, and a fresh
//! `cargo test` wrote gigabytes). Run one area with `cargo test --test integration outbox::`.

mod admin;
mod api_openapi;
mod api_routes;
mod campaign_api;
mod campaign_cli;
mod campaign_crash;
mod campaign_dispatch;
mod campaigns;
mod channel_lease;
mod check;
mod check_root_cause;
mod console;
mod console_browser;
mod contacts_import;
mod conversations;
mod crash;
mod fuzz;
mod hardening;
mod instances;
mod media;
mod media_upload;
mod outbox;
mod policy;
mod policy_properties;
mod readme;
mod reload;
mod retention;
mod scripts;
mod serve;
mod split_api;
mod splits;
mod support;
mod templates_sync;
mod webhooks;
mod whatsapp;
