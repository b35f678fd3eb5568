//! The approved-template registry (`templates.yaml`, written by hand or by
//! `flowgate templates sync`): which templates exist, in
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

    /// Meta's word for a template's state, from the template list (`status`) or a
    /// `message_template_status_update` webhook (`event`), as the registry's status; `None`
    /// for a value Meta does not document (Meta's statuses and status events are `APPROVED`,
    /// `PENDING`, `REJECTED`, `PAUSED`, `DISABLED`, `IN_APPEAL`, `FLAGGED`, `REINSTATED`,
    /// `PENDING_DELETION`, `DELETED`, `ARCHIVED`, `LOCKED`, `LIMIT_EXCEEDED`, `UNARCHIVED`;
    /// only `APPROVED` can be sent). Every value but the approving
    /// ones maps to a status that is not sent, the nearest by what has to happen before the
    /// template could be sent again (see `whatsapp::templates`).
    pub fn from_meta(value: &str) -> Option<Self> {
        Some(match value.trim().to_ascii_uppercase().as_str() {
            "APPROVED" | "REINSTATED" | "UNPAUSED" | "UNARCHIVED" => Self::Approved,
            "PENDING" => Self::Pending,
            "REJECTED" | "IN_APPEAL" | "LIMIT_EXCEEDED" => Self::Rejected,
            "PAUSED" | "FLAGGED" => Self::Paused,
            "DISABLED" | "PENDING_DELETION" | "DELETED" | "ARCHIVED" | "LOCKED" => Self::Disabled,
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

// --- Writing the registry back: `flowgate templates sync` -------------------------------------

/// The registry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// The registry after a sync, and what the sync did to the file's entries.
#[derive(Debug, Clone, Default)]
pub struct Merge {
    pub registry: Registry,
    /// Entries of the file that Meta did not list, kept unchanged.
    pub kept: Vec<Template>,
    /// `name (language)` of templates Meta listed twice; the first one is used.
    pub duplicates: Vec<String>,
}

/// The comment a synced `templates.yaml` starts with: which channel and WABA it came from,
/// and when, so a reader knows the file is generated and how old it is.
pub fn sync_comment(channel: &str, waba_id: &str, at: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        "Synced by `flowgate templates sync` from channel `{channel}` (WABA {waba_id}) at {}.\n\
         A sync replaces the entries Meta lists (same name and language) and keeps the others\n\
         unchanged; comments in this file are not kept.",
        at.format("%Y-%m-%dT%H:%M:%SZ")
    )
}

impl Registry {
    /// Merges the templates Meta lists for one WABA into this registry (the file as it is).
    ///
    /// Meta is the source of truth for what it lists: an entry with the same name and
    /// language is replaced where it stands, and the templates the file does not have yet are
    /// appended sorted by name and language, so a re-sync changes only what changed.
    ///
    /// Entries Meta does not list are **kept unchanged** and reported in [`Merge::kept`]
    /// (the caller warns about each). The registry is one file for every channel, so such an
    /// entry may be another WABA's template, or one written by hand before it is submitted;
    /// dropping it, or marking it disabled, would break flows that are right. The cost is that
    /// a template deleted at Meta stays until someone removes it; the warning names it.
    pub fn merge_synced(&self, synced: Vec<Template>) -> Merge {
        let mut merge = Merge::default();
        let mut fresh: Vec<Template> = Vec::with_capacity(synced.len());
        for t in synced {
            if fresh
                .iter()
                .any(|f| f.name == t.name && f.language == t.language)
            {
                merge
                    .duplicates
                    .push(format!("{} ({})", t.name, t.language));
            } else {
                fresh.push(t);
            }
        }
        for existing in &self.templates {
            let at = fresh
                .iter()
                .position(|t| t.name == existing.name && t.language == existing.language);
            match at {
                Some(i) => merge.registry.templates.push(fresh.remove(i)),
                None => {
                    merge.kept.push(existing.clone());
                    merge.registry.templates.push(existing.clone());
                }
            }
        }
        fresh.sort_by(|a, b| (&a.name, &a.language).cmp(&(&b.name, &b.language)));
        merge.registry.templates.extend(fresh);
        merge
    }

    /// The registry as `templates.yaml` (the shape [`Registry::load`] reads), `comment` on top as `#` lines. Text
    /// is written double-quoted (JSON's escapes are valid YAML), so placeholders, quotes,
    /// colons and line breaks load back exactly.
    pub fn to_yaml(&self, comment: &str) -> String {
        let mut out = String::new();
        for line in comment.lines() {
            out.push_str(format!("# {line}").trim_end());
            out.push('\n');
        }
        if self.templates.is_empty() {
            out.push_str("templates: []\n");
            return out;
        }
        out.push_str("templates:\n");
        for (i, t) in self.templates.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&format!("  - name: {}\n", yaml_key_like(&t.name)));
            out.push_str(&format!("    language: {}\n", yaml_key_like(&t.language)));
            out.push_str(&format!("    category: {}\n", serde_name(&t.category)));
            out.push_str(&format!("    status: {}\n", t.status.as_str()));
            if let Some(header) = &t.header {
                out.push_str(&format!("    header: {}\n", yaml_quoted(header)));
            }
            out.push_str(&format!("    body: {}\n", yaml_quoted(&t.body)));
            if let Some(footer) = &t.footer {
                out.push_str(&format!("    footer: {}\n", yaml_quoted(footer)));
            }
            if !t.buttons.is_empty() {
                out.push_str("    buttons:\n");
                for b in &t.buttons {
                    let fields: Vec<String> = [
                        ("quick_reply", &b.quick_reply),
                        ("payload", &b.payload),
                        ("url", &b.url),
                    ]
                    .into_iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}: {}", yaml_quoted(v))))
                    .collect();
                    out.push_str(&format!("      - {{ {} }}\n", fields.join(", ")));
                }
            }
        }
        out
    }

    /// Writes [`Registry::to_yaml`] to `path` atomically: a temporary file beside it, flushed
    /// to disk, then renamed over it, so `serve` or `check` never read half a registry and a
    /// failed write leaves the old file as it was. The old file's permissions carry over.
    pub fn write_atomic(&self, path: &Path, comment: &str) -> Result<(), WriteError> {
        use std::io::Write as _;
        let error = |source| WriteError {
            path: path.display().to_string(),
            source,
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "templates.yaml".into());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let text = self.to_yaml(comment);
        let written = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            if let Ok(old) = std::fs::metadata(path) {
                std::fs::set_permissions(&tmp, old.permissions())?;
            }
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(error(e));
        }
        // The rename is durable once the directory is; not every platform can open one.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// A value's serde name (`approved`, `utility`): follows the enums' own `rename_all`, so a
/// status added later is written the way it is read.
fn serde_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => panic!("a registry enum serializes as a string, got {other:?}"),
    }
}

/// Double-quoted YAML: a JSON string is a valid YAML double-quoted scalar.
fn yaml_quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// Names and language codes plain when they are plainly strings (`order_shipped`, `en_US`),
/// quoted otherwise (`2023_promo`, `no`, anything with punctuation).
fn yaml_key_like(text: &str) -> String {
    let plain = text.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !matches!(
            text.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        text.to_string()
    } else {
        yaml_quoted(text)
    }
}

#[cfg(test)]
mod sync_tests {
    use super::*;

    fn template(name: &str, language: &str, status: Status, body: &str) -> Template {
        Template {
            name: name.into(),
            language: language.into(),
            category: Category::Utility,
            status,
            header: None,
            body: body.into(),
            footer: None,
            buttons: vec![],
        }
    }

    fn load_text(dir: &Path, text: &str) -> (Registry, Diagnostics) {
        let path = dir.join("templates.yaml");
        std::fs::write(&path, text).unwrap();
        let mut diags = Diagnostics::default();
        let registry = Registry::load(&path, &mut diags);
        (registry, diags)
    }

    #[test]
    fn synced_entries_replace_in_place_and_the_others_are_kept() {
        let file = Registry {
            templates: vec![
                template("welcome", "en_US", Status::Approved, "Hi"),
                template("order_shipped", "en_US", Status::Pending, "Old {{1}}"),
                template("other_waba", "de", Status::Approved, "Hallo"),
            ],
            written_at: None,
        };
        let synced = vec![
            template("zeta", "en_US", Status::Approved, "Z"),
            template(
                "order_shipped",
                "en_US",
                Status::Approved,
                "New {{1}} {{2}}",
            ),
            template("order_shipped", "es", Status::Paused, "Nuevo {{1}} {{2}}"),
            template("alpha", "en_US", Status::Rejected, "A"),
            template("alpha", "en_US", Status::Approved, "A again"),
        ];
        let merge = file.merge_synced(synced);
        let order: Vec<String> = merge
            .registry
            .templates
            .iter()
            .map(|t| format!("{} {} {:?}", t.name, t.language, t.status))
            .collect();
        assert_eq!(
            order,
            [
                "welcome en_US Approved",
                "order_shipped en_US Approved",
                "other_waba de Approved",
                "alpha en_US Rejected",
                "order_shipped es Paused",
                "zeta en_US Approved",
            ]
        );
        assert_eq!(merge.registry.templates[1].body, "New {{1}} {{2}}");
        let kept: Vec<&str> = merge.kept.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(kept, ["welcome", "other_waba"]);
        assert_eq!(merge.duplicates, ["alpha (en_US)"]);
    }

    #[test]
    fn the_written_file_loads_back_without_diagnostics() {
        let dir = tempfile::tempdir().unwrap();
        let mut tricky = template(
            "2023_april_promo",
            "pt_BR",
            Status::Paused,
            "Olá {{1}}: \"50% off\" # today\nline two\ttabbed \\ 🎉 {{order_id}}",
        );
        tricky.category = Category::Marketing;
        tricky.header = Some("{{IMAGE}}".into());
        tricky.footer = Some("'quoted' - no: yes".into());
        tricky.buttons = vec![
            TemplateButton {
                quick_reply: Some("Stop promotions".into()),
                payload: None,
                url: None,
            },
            TemplateButton {
                quick_reply: None,
                payload: None,
                url: Some("https://shop.example/o/{{1}}?a=b&c=d".into()),
            },
        ];
        let mut auth = template("no", "en", Status::Disabled, "*{{1}}* is your code.");
        auth.category = Category::Authentication;
        let registry = Registry {
            templates: vec![
                tricky.clone(),
                auth,
                template("order_ready", "en_US", Status::Approved, "Ready"),
            ],
            written_at: None,
        };
        let path = dir.path().join("templates.yaml");
        let at = chrono::DateTime::from_timestamp(1_780_000_000, 0).unwrap();
        registry
            .write_atomic(&path, &sync_comment("main", "100000000000001", at))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(
                "# Synced by `flowgate templates sync` from channel `main` (WABA 100000000000001) at 2026-"
            ),
            "{text}"
        );
        let (back, diags) = load_text(dir.path(), &text);
        assert!(diags.items.is_empty(), "{}\n{text}", diags.render(false));
        assert_eq!(back.templates.len(), 3);
        let t = &back.templates[0];
        assert_eq!(t.name, tricky.name);
        assert_eq!(t.language, "pt_BR");
        assert_eq!(t.status, Status::Paused);
        assert_eq!(t.category, Category::Marketing);
        assert_eq!(t.body, tricky.body);
        assert_eq!(t.header, tricky.header);
        assert_eq!(t.footer, tricky.footer);
        assert_eq!(t.param_count(), 3);
        assert_eq!(t.buttons[0].quick_reply.as_deref(), Some("Stop promotions"));
        assert_eq!(t.buttons[1].url, tricky.buttons[1].url);
        assert_eq!(back.templates[1].name, "no");
        assert_eq!(back.templates[1].category, Category::Authentication);
        assert_eq!(back.templates[1].status, Status::Disabled);
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["templates.yaml"]);
    }

    #[test]
    fn an_empty_registry_is_written_as_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        let text = Registry::default().to_yaml("nothing yet");
        assert_eq!(text, "# nothing yet\ntemplates: []\n");
        let (back, diags) = load_text(dir.path(), &text);
        assert!(diags.items.is_empty(), "{}", diags.render(false));
        assert!(back.templates.is_empty());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no_such_dir/templates.yaml");
        let e = Registry::default().write_atomic(&missing, "x").unwrap_err();
        assert!(e.to_string().contains("no_such_dir"), "{e}");
    }
}
