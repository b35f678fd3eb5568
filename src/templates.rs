//! The approved-template registry (`templates.yaml`, DESIGN §2.4): which templates exist, in
//! which language, with how many parameters and in which status. `check` verifies every
//! template a flow names against it; the policy layer will only send `approved` ones.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::yaml;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Marketing,
    Utility,
    Authentication,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Approved,
    Pending,
    Rejected,
    Paused,
    Disabled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Pending => "pending",
            Self::Rejected => "rejected",
            Self::Paused => "paused",
            Self::Disabled => "disabled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "approved" => Self::Approved,
            "pending" => Self::Pending,
            "rejected" => Self::Rejected,
            "paused" => Self::Paused,
            "disabled" => Self::Disabled,
            _ => return None,
        })
    }

    /// The status a `message_template_status_update` event leaves a template in (FACTS.md
    /// §1.7); `None` for events that do not change whether it can be sent (`FLAGGED` is a
    /// quality warning: the template still sends).
    pub fn from_event(event: &str) -> Option<Self> {
        Some(match event.to_ascii_uppercase().as_str() {
            "APPROVED" | "REINSTATED" | "UNPAUSED" | "UNARCHIVED" => Self::Approved,
            "PENDING" | "IN_APPEAL" => Self::Pending,
            "REJECTED" => Self::Rejected,
            "PAUSED" => Self::Paused,
            "DISABLED" | "DELETED" | "PENDING_DELETION" | "ARCHIVED" | "LOCKED"
            | "LIMIT_EXCEEDED" => Self::Disabled,
            _ => return None,
        })
    }
}

/// Meta writes languages both as `en_US` and `en-US`; the registry uses `en_US`.
pub fn normalize_language(language: &str) -> String {
    language.replace('-', "_")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateButton {
    #[serde(default)]
    pub quick_reply: Option<String>,
    #[serde(default)]
    pub payload: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    pub language: String,
    pub category: Category,
    pub status: Status,
    #[serde(default)]
    pub header: Option<String>,
    pub body: String,
    #[serde(default)]
    pub footer: Option<String>,
    #[serde(default)]
    pub buttons: Vec<TemplateButton>,
}

impl Template {
    /// How many parameters a send must supply: the distinct `{{1}}`/`{{name}}` placeholders
    /// of the header and body.
    pub fn param_count(&self) -> usize {
        let mut names: Vec<&str> = Vec::new();
        for text in self.header.iter().chain(std::iter::once(&self.body)) {
            let mut rest = text.as_str();
            while let Some(start) = rest.find("{{") {
                let after = &rest[start + 2..];
                let Some(end) = after.find("}}") else { break };
                let name = after[..end].trim();
                if !names.contains(&name) {
                    names.push(name);
                }
                rest = &after[end + 2..];
            }
        }
        names.len()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    #[serde(default)]
    templates: Vec<Spanned<Template>>,
}

/// The templates a business may send.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub templates: Vec<Template>,
    /// When the registry file was last written: template statuses WhatsApp reported after
    /// that override the file's (see `Runtime::load_template_statuses`).
    pub written_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Registry {
    /// Loads `path`; a missing file is an empty registry (not every bot uses templates).
    pub fn load(path: &Path, diags: &mut Diagnostics) -> Registry {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Registry::default(),
            Err(e) => {
                diags.push(Diagnostic::error(
                    &file,
                    None,
                    format!("cannot read templates: {e}"),
                ));
                return Registry::default();
            }
        };
        diags.add_source(&file, Arc::from(text.as_str()));
        match yaml::parse::<RawRegistry>(&file, &text) {
            Ok(raw) => {
                let mut registry = Registry {
                    written_at: std::fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .map(chrono::DateTime::<chrono::Utc>::from),
                    ..Registry::default()
                };
                for t in raw.templates {
                    if registry.find(&t.value.name, &t.value.language).is_some() {
                        diags.push(Diagnostic::error(
                            &file,
                            Some(yaml::loc(&t)),
                            format!(
                                "template `{}` ({}) is listed twice",
                                t.value.name, t.value.language
                            ),
                        ));
                    }
                    registry.templates.push(t.value);
                }
                registry
            }
            Err(d) => {
                diags.push(*d);
                Registry::default()
            }
        }
    }

    pub fn find(&self, name: &str, language: &str) -> Option<&Template> {
        self.templates
            .iter()
            .find(|t| t.name == name && t.language == language)
    }

    /// Languages a template exists in, for "did you mean" help.
    pub fn languages_of(&self, name: &str) -> Vec<&str> {
        self.templates
            .iter()
            .filter(|t| t.name == name)
            .map(|t| t.language.as_str())
            .collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.templates.iter().map(|t| t.name.as_str())
    }

    /// Sets a template's status (a status webhook); `false` if the registry does not list it.
    pub fn set_status(&mut self, name: &str, language: &str, status: Status) -> bool {
        let language = normalize_language(language);
        match self
            .templates
            .iter_mut()
            .find(|t| t.name == name && t.language == language)
        {
            Some(t) => {
                t.status = status;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_placeholders() {
        let t = Template {
            name: "x".into(),
            language: "en_US".into(),
            category: Category::Utility,
            status: Status::Approved,
            header: Some("Hi {{1}}".into()),
            body: "Order {{2}} for {{1}} ships {{3}}".into(),
            footer: None,
            buttons: vec![],
        };
        assert_eq!(t.param_count(), 3);
    }
}
