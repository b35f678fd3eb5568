//! Campaigns: business-initiated sends on a schedule, within WhatsApp's rules.

pub mod schedule;
