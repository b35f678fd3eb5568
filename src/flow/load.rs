//! Loading a whole project: every flow file under the flows directory, the scripts they
//! name, the template registry and the campaigns, then the checks that need all flows at
//! once (duplicate ids, references to other flows, trigger conflicts, the `fallback` flow,
//! campaigns' `on_reply` flows, the window lint with the campaigns' entries).
//!
//! This is the one loader: `check` prints its diagnostics, `serve`, `chat` and `test` refuse
//! to start on errors and print the same diagnostics.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::compile::{Compiled, FlowRef, compile_flow};
use super::lint::{Window, sending_loops, window_hazards};
use super::{Bundle, Flow, TriggerKind};
use crate::campaign::{self, Campaign};
use crate::config::Config;
use crate::diagnostic::{Diagnostic, Diagnostics, Loc, did_you_mean};
use crate::script::Scripting;
use crate::templates::Registry;

/// Everything `check` validates and `serve` runs.
#[derive(Debug, Default)]
pub struct Project {
    pub flows: Vec<Arc<Flow>>,
    /// Flows read despite their errors (see [`Compiled::partial`]): checked and linted with
    /// the others, never run (a project with an error does not start).
    pub partial: Vec<Arc<Flow>>,
    /// The ids of flows whose file has an error and could not be read at all (the `flow:`
    /// id read on its own): a campaign naming one is not another error.
    pub unloaded: Vec<String>,
    pub templates: Registry,
    /// The campaigns (empty when any campaign has an error).
    pub campaigns: Vec<Arc<Campaign>>,
    pub diagnostics: Diagnostics,
}

impl Project {
    /// The flows `check` checks: those that run, then those read despite their errors.
    pub fn checked_flows(&self) -> Vec<Arc<Flow>> {
        self.flows.iter().chain(&self.partial).cloned().collect()
    }
}

/// Loads the flows, scripts, templates and campaigns the config names.
pub fn load_project(config: &Config, scripting: &Scripting) -> Project {
    let mut diags = Diagnostics::default();
    let templates = Registry::load(&config.templates, &mut diags);
    let sources = match flow_files(&config.flows) {
        Ok(mut files) => {
            // Campaigns kept under the flows directory are not flows.
            files.retain(|f| !f.starts_with(&config.campaigns));
            read_all(files, &mut diags)
        }
        Err(e) => {
            diags.push(Diagnostic::error(
                config.flows.display().to_string(),
                None,
                format!("cannot read the flows directory: {e}"),
            ));
            Vec::new()
        }
    };
    let scripts_dir = config.scripts.clone();
    let find_script = move |name: &str| read_script(&scripts_dir, name);
    let mut project = compile_sources(
        &sources,
        scripting,
        templates,
        &find_script,
        config.fallback.as_deref(),
    );
    diags.extend(std::mem::take(&mut project.diagnostics));
    load_campaigns(config, scripting, &mut project, &mut diags);
    let entries = campaign::compile::reply_entries(&project.campaigns);
    let window = Window::from_policy(&config.policy);
    for warning in window_hazards(&project.checked_flows(), window, &entries) {
        diags.push(warning);
    }
    let checked = project.checked_flows();
    check_project_files(config, &checked, &project.campaigns, &mut diags);
    let flow_ids: Vec<&str> = checked.iter().map(|f| f.id.as_str()).collect();
    let config_file = config
        .file
        .as_ref()
        .map_or_else(|| "flowgate.yaml".to_string(), |f| f.display().to_string());
    for problem in
        crate::policy::check_fallbacks(&config.policy.outside_window, &project.templates, &flow_ids)
    {
        diags.push(match problem.error {
            true => Diagnostic::error(&config_file, None, problem.message),
            false => Diagnostic::warning(&config_file, None, problem.message),
        });
    }
    project.diagnostics = diags;
    project
}

/// The project files messages send (`media: {file: …}`) exist under the project's directory
/// and fit WhatsApp's limits for their kind (type by extension and first bytes, size), by
/// the table the sender uploads by ([`crate::whatsapp::media_files`]). A missing file is an
/// error at its `file:`, with the nearest name in its directory.
fn check_project_files(
    config: &Config,
    flows: &[Arc<Flow>],
    campaigns: &[Arc<Campaign>],
    diags: &mut Diagnostics,
) {
    let files = flows
        .iter()
        .flat_map(|f| {
            f.project_files()
                .into_iter()
                .map(|(k, p)| (f.file.as_str(), k, p))
        })
        .chain(campaigns.iter().flat_map(|c| {
            c.in_window_messages().filter_map(|m| {
                let (kind, file) = m.project_file()?;
                Some((c.file.as_str(), kind, file))
            })
        }));
    for (source, kind, file) in files {
        if let Err((message, help)) = check_project_file(&config.root, kind, &file.path) {
            diags.push(Diagnostic::error(source, Some(file.loc), message).with_help(help));
        }
    }
}

/// One project file: `Err((message, help))` when it is missing, unreadable or does not fit.
fn check_project_file(root: &Path, kind: &str, path: &str) -> Result<(), (String, String)> {
    use std::io::Read;
    let full = root.join(path);
    let meta = match std::fs::metadata(&full) {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) => {
            return Err((
                format!("`{path}` is a directory, not a file"),
                "name a file in it".into(),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let help = nearest_file(&full, path).map_or_else(
                || format!("put the file at {} or fix the path", full.display()),
                |near| format!("did you mean `{near}`?"),
            );
            return Err((format!("the project file `{path}` does not exist"), help));
        }
        Err(e) => {
            return Err((
                format!("cannot read the project file `{path}`: {e}"),
                "check its permissions".into(),
            ));
        }
    };
    let mut head = Vec::with_capacity(crate::whatsapp::media_files::SNIFF_BYTES);
    std::fs::File::open(&full)
        .and_then(|f| {
            f.take(crate::whatsapp::media_files::SNIFF_BYTES as u64)
                .read_to_end(&mut head)
        })
        .map_err(|e| {
            (
                format!("cannot read the project file `{path}`: {e}"),
                "check its permissions".into(),
            )
        })?;
    let name = full
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned());
    crate::whatsapp::media_files::check_file(kind, &name, &head, meta.len())
        .map(|_| ())
        .map_err(|m| (m.message, m.help))
}

/// The name nearest to a missing file's among the files of its directory, as a path like
/// the one written.
fn nearest_file(full: &Path, written: &str) -> Option<String> {
    let dir = full.parent()?;
    let wanted = full.file_name()?.to_string_lossy().into_owned();
    let names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let near = did_you_mean(&wanted, names.iter().map(String::as_str))?;
    let near = near
        .trim_start_matches("did you mean `")
        .trim_end_matches("`?")
        .to_string();
    Some(match written.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{near}"),
        None => near,
    })
}

/// The campaigns under the config's `campaigns` directory (none when it does not exist),
/// checked against the project's templates, channels and flows.
fn load_campaigns(
    config: &Config,
    scripting: &Scripting,
    project: &mut Project,
    diags: &mut Diagnostics,
) {
    let files = match crate::yaml::yaml_files(&config.campaigns) {
        Ok(files) => files,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            diags.push(Diagnostic::error(
                config.campaigns.display().to_string(),
                None,
                format!("cannot read the campaigns directory: {e}"),
            ));
            return;
        }
    };
    let sources = read_all(files, diags);
    let env = campaign::compile::Env {
        scripting,
        templates: &project.templates,
        channels: &config.channels,
    };
    let checked = project.checked_flows();
    let flow_ids: Vec<&str> = checked
        .iter()
        .map(|f| f.id.as_str())
        .chain(project.unloaded.iter().map(String::as_str))
        .collect();
    let (campaigns, found) = campaign::compile::compile_campaigns(&sources, &env, &flow_ids);
    diags.extend(found);
    project.campaigns = campaigns;
}

/// Each file's text, `(file, text)`; a file that cannot be read is an error.
fn read_all(files: Vec<PathBuf>, diags: &mut Diagnostics) -> Vec<(String, String)> {
    let mut sources = Vec::new();
    for path in files {
        let file = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => sources.push((file, text)),
            Err(e) => diags.push(Diagnostic::error(file, None, format!("cannot read: {e}"))),
        }
    }
    sources
}

/// Loads flows from in-memory sources, with the window lint: the flows' part of
/// [`load_project`], and what benchmarks and tests use.
pub fn load_sources(
    sources: &[(String, String)],
    scripting: &Scripting,
    templates: Registry,
    find_script: super::compile::ScriptSource<'_>,
    fallback: Option<&str>,
    window: Window,
) -> Project {
    let mut project = compile_sources(sources, scripting, templates, find_script, fallback);
    for warning in window_hazards(&project.checked_flows(), window, &[]) {
        project.diagnostics.push(warning);
    }
    project
}

/// Compiles the flows and checks them together (unique ids, references to other flows,
/// the `fallback` flow, trigger conflicts); the window lint comes after, once the campaigns
/// that enter flows are known.
fn compile_sources(
    sources: &[(String, String)],
    scripting: &Scripting,
    templates: Registry,
    find_script: super::compile::ScriptSource<'_>,
    fallback: Option<&str>,
) -> Project {
    let mut diags = Diagnostics::default();
    let mut compiled: Vec<Compiled> = sources
        .iter()
        .map(|(file, text)| compile_flow(file, text, scripting, &templates, find_script))
        .collect();
    let ids: Vec<(String, String, Loc)> = compiled
        .iter()
        .zip(sources)
        .filter_map(|(c, (file, _))| c.id.clone().map(|(id, loc)| (id, file.clone(), loc)))
        .collect();
    for (i, (id, file, loc)) in ids.iter().enumerate() {
        if let Some((_, first_file, first_loc)) = ids[..i].iter().find(|(other, ..)| other == id) {
            diags.push(
                Diagnostic::error(file, Some(*loc), format!("two flows have the id `{id}`"))
                    .with_label("second definition")
                    .with_help(format!(
                        "the first is at {first_file}:{}:{}",
                        first_loc.line, first_loc.col
                    )),
            );
        }
    }
    let loaded: Vec<bool> = compiled
        .iter()
        .map(|c| c.flow.is_some() || c.partial.is_some())
        .collect();
    for (c, (file, _)) in compiled.iter().zip(sources) {
        for FlowRef { flow, loc } in &c.flow_refs {
            if let Some(d) = flow_reference(flow, file, Some(*loc), &compiled, &loaded) {
                diags.push(d);
            }
        }
    }
    if let Some(fallback) = fallback
        && let Some(mut d) = flow_reference(fallback, "flowgate.yaml", None, &compiled, &loaded)
    {
        if d.follows_from.is_none() {
            d.message = format!("the `fallback` flow `{fallback}` does not exist");
        }
        diags.push(d);
    }
    let (mut flows, mut partial) = (Vec::new(), Vec::new());
    let mut keyword_locs = Vec::new();
    for c in &mut compiled {
        diags.extend(std::mem::take(&mut c.diagnostics));
        if let Some(flow) = c.flow.take() {
            flows.push(Arc::new(flow));
            keyword_locs.push(std::mem::take(&mut c.keyword_locs));
        }
    }
    // Flows read despite their errors are checked with the others, after them (so the
    // keyword locations still line up with `flows`).
    for c in &mut compiled {
        if let Some(flow) = c.partial.take() {
            partial.push(Arc::new(flow));
            keyword_locs.push(std::mem::take(&mut c.keyword_locs));
        }
    }
    let unloaded = compiled
        .iter()
        .zip(&loaded)
        .filter(|(_, ok)| !**ok)
        .filter_map(|(c, _)| c.id.as_ref().map(|(id, _)| id.clone()))
        .collect();
    let checked: Vec<Arc<Flow>> = flows.iter().chain(&partial).cloned().collect();
    trigger_conflicts(&checked, &keyword_locs, &mut diags);
    for error in sending_loops(&checked) {
        diags.push(error);
    }
    Project {
        flows,
        partial,
        unloaded,
        templates,
        campaigns: Vec::new(),
        diagnostics: diags,
    }
}

/// The error for a reference to the flow `id` (at `file` and `loc`), or `None` when it is
/// loaded. A flow whose file has an error and could not be read says so and points at that
/// error, listed after it ([`Diagnostic::following`]); an unknown one suggests the nearest.
fn flow_reference(
    id: &str,
    file: &str,
    loc: Option<Loc>,
    compiled: &[Compiled],
    loaded: &[bool],
) -> Option<Diagnostic> {
    let named = |c: &&Compiled| c.id.as_ref().is_some_and(|(other, _)| other == id);
    if compiled.iter().zip(loaded).any(|(c, &ok)| ok && named(&c)) {
        return None;
    }
    if let Some(root) = compiled
        .iter()
        .find(named)
        .and_then(|c| c.diagnostics.sorted().into_iter().find(|d| d.is_error()))
    {
        let position = root.position();
        return Some(
            Diagnostic::error(
                file,
                loc,
                format!("flow `{id}` did not load (see its error in {position})"),
            )
            .with_label("this flow has an error")
            .with_help(format!("fix the error in {position} first"))
            .following(position),
        );
    }
    let known = compiled.iter().filter_map(|c| c.id.as_ref());
    let mut d =
        Diagnostic::error(file, loc, format!("there is no flow `{id}`")).with_label("unknown flow");
    d.help = did_you_mean(id, known.map(|(id, _)| id.as_str()));
    Some(d)
}

/// Compiles an old flow version again from its stored bundle.
pub fn compile_bundle(
    bundle: &Bundle,
    scripting: &Scripting,
    templates: &Registry,
) -> Result<Flow, Diagnostics> {
    let scripts = bundle.scripts.clone();
    let find = move |name: &str| {
        scripts
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, path, text)| (path.clone(), text.clone()))
            .ok_or_else(|| format!("script `{name}` is missing from the stored flow version"))
    };
    let mut compiled = compile_flow(&bundle.file, &bundle.text, scripting, templates, &find);
    compiled.flow.take().ok_or(compiled.diagnostics)
}

/// Two flows that claim the same message at the same priority: which one runs would depend
/// on file order, so it is an error. `keyword_locs` holds, per flow and trigger, where each
/// keyword is written (see [`Compiled::keyword_locs`]).
fn trigger_conflicts(flows: &[Arc<Flow>], keyword_locs: &[Vec<Vec<Loc>>], diags: &mut Diagnostics) {
    let mut claims: Vec<(String, i32, &str, &Flow, Loc)> = Vec::new();
    for (f, flow) in flows.iter().enumerate() {
        for (i, t) in flow.triggers.iter().enumerate() {
            let word_loc = |j: usize| {
                let locs = keyword_locs.get(f).and_then(|locs| locs.get(i));
                locs.and_then(|locs| locs.get(j)).copied().unwrap_or(t.loc)
            };
            let keys: Vec<(String, Loc)> = match &t.kind {
                TriggerKind::Keywords { words, .. } => words
                    .iter()
                    .enumerate()
                    .map(|(j, w)| (format!("keyword `{w}`"), word_loc(j)))
                    .collect(),
                TriggerKind::Button(id) => vec![(format!("button `{id}`"), t.loc)],
                TriggerKind::List(id) => vec![(format!("list row `{id}`"), t.loc)],
                TriggerKind::Any => vec![("any message".to_string(), t.loc)],
                TriggerKind::Regex(_) => vec![],
            };
            for (key, at) in keys {
                if let Some((_, _, _, other, other_loc)) = claims
                    .iter()
                    .find(|(k, p, ..)| *k == key && *p == t.priority)
                {
                    if other.id != flow.id {
                        diags.push(
                            Diagnostic::error(
                                &flow.file,
                                Some(at),
                                format!("{key} already starts flow `{}`", other.id),
                            )
                            .with_label("conflicting trigger")
                            .with_help(format!(
                                "see {}:{}:{}; remove one, or give one a higher `priority`",
                                other.file, other_loc.line, other_loc.col
                            )),
                        );
                    }
                } else {
                    claims.push((key, t.priority, flow.id.as_str(), flow, at));
                }
            }
        }
    }
}

/// The flow files under `dir`: every YAML file except conversation tests (`*.test.yaml`).
fn flow_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = crate::yaml::yaml_files(dir)?;
    files.retain(|f| !crate::yaml::is_test_file(f));
    Ok(files)
}

/// Reads `name` from the scripts directory, refusing paths that leave it.
fn read_script(dir: &Path, name: &str) -> Result<(String, String), String> {
    if name.contains("..") || Path::new(name).is_absolute() {
        return Err(format!(
            "script `{name}` must be a path inside the scripts directory"
        ));
    }
    let path = dir.join(name);
    let shown = path.display().to_string();
    std::fs::read_to_string(&path)
        .map(|text| (shown.clone(), text))
        .map_err(|e| {
            let mut message = format!("cannot read script `{shown}`: {e}");
            if let Ok(entries) = std::fs::read_dir(dir) {
                let names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                if let Some(hint) = did_you_mean(name, names.iter().map(String::as_str)) {
                    message.push_str(&format!(" ({hint})"));
                }
            }
            message
        })
}
