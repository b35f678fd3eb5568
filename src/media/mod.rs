//! Media flowgate sends: project files uploaded to WhatsApp and sent by id (`upload`).

pub mod upload;
