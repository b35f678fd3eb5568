//! The Rhai sandbox: one shared, locked-down engine for scripts, `if:` conditions and
//! `{{ … }}` interpolation.
//!
//! Locked down means: no module imports (the resolver refuses every path), no `eval`, no file
//! or network functions (Rhai has none unless registered, and we register none), and limits on
//! operations, call depth, expression depth, string, array and map sizes, and on wall-clock
//! time. A script that loops forever stops at the operation limit, and one whose few
//! operations are each heavy (string work on 60 KB) stops at the time limit, with an error
//! that names its line; the engine then routes the conversation to `on_error`, and every other
//! conversation is unaffected.
//!
//! The time limit is the one place a pure module reads a clock: a monotonic [`Instant`],
//! checked every few operations from Rhai's progress callback. It only bounds how long the
//! sandbox may run; no result of a script depends on it (scripts read time from the turn's
//! `now`).
//!
//! Scripts talk back through a few registered functions (`reply`, `reply_buttons`, `goto`,
//! `tag`, `untag`) and read time through `now`, `today`, `day_of_week` and `add_days`. They write into a per-call [`ScriptEffects`] held in a
//! thread-local for the duration of one synchronous call, which is why the engine can stay
//! shared and immutable.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rhai::{AST, Dynamic, Engine, EvalAltResult, ImmutableString, Map, Position, Scope};

/// The variables of a conversation, as scripts and expressions see them.
pub type Vars = Map;

/// Limits that keep one script from starving the others.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
    /// Wall-clock time one script or expression may run (`limits.script_timeout`).
    pub timeout: Duration,
}

/// The default of [`Limits::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

/// Operations between two looks at the clock: often enough that a script of heavy
/// operations overshoots its time by milliseconds, rarely enough to cost nothing measurable.
const CLOCK_EVERY: u64 = 16;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: 100_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_string_size: 64 * 1024,
            max_array_size: 10_000,
            max_map_size: 10_000,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A script or expression that failed to compile or to run, with its position in the script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ScriptError {
    pub message: String,
    /// 1-based line and column inside the script or expression text.
    pub line: Option<usize>,
    pub col: Option<usize>,
    /// Stopped by the time limit (counted apart: it says the sandbox is too slow or the
    /// script too heavy, not that the flow is wrong).
    pub timed_out: bool,
}

impl ScriptError {
    fn at(message: String, pos: Position) -> Self {
        Self {
            message,
            line: pos.line(),
            col: pos.position(),
            timed_out: false,
        }
    }

    /// An error with no position in a script (a failed request, a missing step).
    pub fn plain(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            line: None,
            col: None,
            timed_out: false,
        }
    }

    /// `line 3, column 7` or nothing.
    pub fn where_(&self) -> String {
        match (self.line, self.col) {
            (Some(l), Some(c)) => format!("line {l}, column {c}"),
            (Some(l), None) => format!("line {l}"),
            _ => "an unknown position".into(),
        }
    }
}

/// What a script asked for besides changing variables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScriptEffects {
    pub replies: Vec<ScriptReply>,
    pub goto: Option<String>,
    /// `(true, tag)` to add, `(false, tag)` to remove, in call order.
    pub tags: Vec<(bool, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ScriptReply {
    Text(String),
    Buttons {
        text: String,
        buttons: Vec<(String, String)>,
    },
}

struct CallState {
    /// When the call began, for the time limit.
    started: Instant,
    now: DateTime<Utc>,
    timezone: Option<chrono_tz::Tz>,
    effects: ScriptEffects,
}

thread_local! {
    static CALL: RefCell<Option<CallState>> = const { RefCell::new(None) };
}

/// Runs `f` with a fresh per-call state and returns what the script asked for.
fn with_call<T>(ctx: &Context<'_>, f: impl FnOnce() -> T) -> (T, ScriptEffects) {
    let previous = CALL.with(|c| {
        c.borrow_mut().replace(CallState {
            started: Instant::now(),
            now: ctx.now,
            timezone: ctx.timezone,
            effects: ScriptEffects::default(),
        })
    });
    let result = f();
    let state = CALL.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
    (result, state.map(|s| s.effects).unwrap_or_default())
}

fn record(f: impl FnOnce(&mut ScriptEffects)) {
    CALL.with(|c| {
        if let Some(state) = c.borrow_mut().as_mut() {
            f(&mut state.effects);
        }
    });
}

fn parse_iso_date(date: &str) -> Result<chrono::NaiveDate, Box<EvalAltResult>> {
    chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .map_err(|_| format!("`{date}` is not a date like 2026-01-12").into())
}

fn call_now() -> DateTime<Utc> {
    CALL.with(|c| c.borrow().as_ref().map(|s| s.now))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn call_today() -> chrono::NaiveDate {
    CALL.with(|c| c.borrow().as_ref().map(|s| local_date(s.now, s.timezone)))
        .unwrap_or_default()
}

/// The calendar date at `now` where the contact lives (UTC when their timezone is unknown):
/// what "today" means to them.
pub fn local_date(now: DateTime<Utc>, timezone: Option<chrono_tz::Tz>) -> chrono::NaiveDate {
    match timezone {
        Some(tz) => now.with_timezone(&tz).date_naive(),
        None => now.date_naive(),
    }
}

/// The inputs of one evaluation: the conversation's variables, `contact` and `message`.
pub struct Context<'a> {
    pub vars: &'a Vars,
    pub contact: &'a Dynamic,
    pub message: &'a Dynamic,
    pub now: DateTime<Utc>,
    /// The contact's timezone, for `today()`.
    pub timezone: Option<chrono_tz::Tz>,
}

/// Stops every call that has run longer than `timeout` (Rhai then answers
/// `ErrorTerminated`, which [`runtime_error`] reports as a timeout).
fn stop_after(engine: &mut Engine, timeout: Duration) {
    engine.on_progress(move |ops| {
        if ops % CLOCK_EVERY != 0 {
            return None;
        }
        let late = CALL.with(|c| {
            c.borrow()
                .as_ref()
                .is_some_and(|s| s.started.elapsed() > timeout)
        });
        late.then_some(Dynamic::UNIT)
    });
}

/// The shared Rhai engine.
pub struct Scripting {
    engine: Engine,
    limits: Limits,
}

impl std::fmt::Debug for Scripting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripting")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for Scripting {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Scripting {
    pub fn new(limits: Limits) -> Self {
        let mut engine = Engine::new();
        engine
            .set_max_operations(limits.max_operations)
            .set_max_call_levels(limits.max_call_levels)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
            .set_max_string_size(limits.max_string_size)
            .set_max_array_size(limits.max_array_size)
            .set_max_map_size(limits.max_map_size)
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.disable_symbol("eval");
        stop_after(&mut engine, limits.timeout);
        // A variable nobody set reads as `()`, so flows can ask `if: 'order_id != ()'`.
        // Assigning to it still needs `let`, as in any Rhai script.
        #[allow(deprecated)] // "volatile", not deprecated: Rhai's own wording
        engine.on_var(|name, _, ctx| Ok((!ctx.scope().contains(name)).then_some(Dynamic::UNIT)));
        engine.on_print(|text| tracing::info!(target: "flowgate::script", "{text}"));
        engine.on_debug(|text, _, pos| tracing::debug!(target: "flowgate::script", ?pos, "{text}"));

        engine.register_fn("reply", |text: ImmutableString| {
            record(|e| e.replies.push(ScriptReply::Text(text.to_string())));
        });
        engine.register_fn(
            "reply_buttons",
            |text: ImmutableString, buttons: rhai::Array| -> Result<(), Box<EvalAltResult>> {
                let mut pairs = Vec::new();
                for b in buttons {
                    let pair = b
                        .try_cast::<rhai::Array>()
                        .filter(|p| p.len() == 2)
                        .ok_or("reply_buttons expects [[id, title], …]")?;
                    pairs.push((pair[0].to_string(), pair[1].to_string()));
                }
                record(|e| {
                    e.replies.push(ScriptReply::Buttons {
                        text: text.to_string(),
                        buttons: pairs,
                    })
                });
                Ok(())
            },
        );
        engine.register_fn("jump", |step: ImmutableString| {
            record(|e| e.goto = Some(step.to_string()));
        });
        engine.register_fn("tag", |name: ImmutableString| {
            record(|e| e.tags.push((true, name.to_string())));
        });
        engine.register_fn("untag", |name: ImmutableString| {
            record(|e| e.tags.push((false, name.to_string())));
        });
        engine.register_fn("now", || call_now().timestamp());
        engine.register_fn(
            "day_of_week",
            |date: ImmutableString| -> Result<i64, Box<EvalAltResult>> {
                let d = parse_iso_date(&date)?;
                Ok(i64::from(
                    chrono::Datelike::weekday(&d).number_from_monday(),
                ))
            },
        );
        engine.register_fn(
            "add_days",
            |date: ImmutableString, days: i64| -> Result<String, Box<EvalAltResult>> {
                let d = parse_iso_date(&date)? + chrono::Duration::days(days);
                Ok(d.format("%Y-%m-%d").to_string())
            },
        );
        engine.register_fn("today", || call_today().format("%Y-%m-%d").to_string());
        Self { engine, limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn compile_script(&self, source: &str) -> Result<AST, ScriptError> {
        self.engine
            .compile(rename_goto(source))
            .map_err(|e| ScriptError::at(e.0.to_string(), e.1))
    }

    pub fn compile_expression(&self, source: &str) -> Result<AST, ScriptError> {
        self.engine
            .compile_expression(source)
            .map_err(|e| ScriptError::at(e.0.to_string(), e.1))
    }

    /// The scope of one evaluation. `message` and `contact` arrive as shared values (cheap
    /// to clone); a script gets its own copy of `contact`, so a script that fails halfway
    /// changes nothing.
    fn scope<'s>(ctx: &Context<'_>, own_contact: bool) -> Scope<'s> {
        let mut scope = Scope::with_capacity(ctx.vars.len() + 2);
        for (name, value) in ctx.vars {
            scope.push_dynamic(name.as_str(), value.clone());
        }
        scope.push_constant_dynamic("message", ctx.message.clone());
        let contact = if own_contact {
            ctx.contact.flatten_clone()
        } else {
            ctx.contact.clone()
        };
        scope.push_dynamic("contact", contact);
        scope
    }

    /// Evaluates an expression to a value.
    pub fn eval(&self, ast: &AST, ctx: &Context<'_>) -> Result<Dynamic, ScriptError> {
        let mut scope = Self::scope(ctx, false);
        let (result, _) = with_call(ctx, || {
            self.engine.eval_ast_with_scope::<Dynamic>(&mut scope, ast)
        });
        result.map_err(|e| runtime_error(&e, self.limits))
    }

    /// Evaluates an `if:` condition; anything but `true` or `false` is an error.
    pub fn eval_condition(&self, ast: &AST, ctx: &Context<'_>) -> Result<bool, ScriptError> {
        let value = self.eval(ast, ctx)?;
        value.as_bool().map_err(|type_name| {
            ScriptError::plain(format!(
                "a condition must be true or false, but this one is a {type_name}"
            ))
        })
    }

    /// Runs a script. Returns the variables to keep (every top-level variable not starting
    /// with `_`), the possibly changed `contact`, and what the script asked for.
    pub fn run(&self, ast: &AST, ctx: &Context<'_>) -> Result<ScriptRun, ScriptError> {
        let mut scope = Self::scope(ctx, true);
        let (result, effects) = with_call(ctx, || self.engine.run_ast_with_scope(&mut scope, ast));
        result.map_err(|e| runtime_error(&e, self.limits))?;
        let mut vars = Vars::new();
        let mut contact = ctx.contact.clone();
        for (name, _, value) in scope.iter_raw() {
            match name {
                "message" => {}
                "contact" => contact = value.flatten_clone(),
                n if n.starts_with('_') => {}
                n => {
                    vars.insert(n.into(), value.clone());
                }
            }
        }
        Ok(ScriptRun {
            vars,
            contact,
            effects,
        })
    }
}

/// Rhai reserves the word `goto`, but flows promise scripts a `goto(step)`: calls to it
/// (outside strings and comments) are read as `jump(step)`, a name of the same length, so
/// error columns stay right.
fn rename_goto(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut last = 0;
    for (i, word) in code_words(source) {
        if word == "goto" && source[i + 4..].trim_start().starts_with('(') {
            out.push_str(&source[last..i]);
            out.push_str("jump");
            last = i + 4;
        }
    }
    out.push_str(&source[last..]);
    out
}

/// The words of code (identifiers and keywords, outside strings, comments and numbers) with
/// their byte offsets: what the source-level checks look at.
fn code_words(source: &str) -> Vec<(usize, &str)> {
    let bytes = source.as_bytes();
    let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut words = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' | b'`' | b'\'' => {
                let quote = bytes[i];
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b if word_byte(b) => {
                let start = i;
                while i < bytes.len() && word_byte(bytes[i]) {
                    i += 1;
                }
                if !b.is_ascii_digit() {
                    words.push((start, &source[start..i]));
                }
            }
            _ => i += 1,
        }
    }
    words
}

/// A place in a script's source: 1-based line and column (in characters), and its length
/// in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spot {
    pub line: usize,
    pub col: usize,
    pub len: usize,
}

impl Spot {
    fn of(source: &str, offset: usize, len: usize) -> Self {
        let before = &source[..offset];
        let line_start = before.rfind('\n').map_or(0, |n| n + 1);
        Self {
            line: before.matches('\n').count() + 1,
            col: before[line_start..].chars().count() + 1,
            len,
        }
    }
}

/// Every `goto("step")` whose argument is a string literal, with the step's name and where
/// the call is: the jumps `check` can follow and verify.
pub fn literal_gotos(source: &str) -> Vec<(String, Spot)> {
    code_words(source)
        .into_iter()
        .filter(|(_, word)| *word == "goto")
        .filter_map(|(i, _)| {
            let rest = source[i + 4..].trim_start().strip_prefix('(')?.trim_start();
            let name = rest.strip_prefix('"')?;
            let end = name.find(['"', '\\', '\n'])?;
            let after = name[end..].strip_prefix('"')?.trim_start();
            after.starts_with(')').then(|| {
                let len = source.len() - i - after.len() + 1;
                (name[..end].to_string(), Spot::of(source, i, len))
            })
        })
        .collect()
}

/// Every `import` statement: the sandbox refuses them all when the script runs.
pub fn imports(source: &str) -> Vec<Spot> {
    code_words(source)
        .into_iter()
        .filter(|(_, word)| *word == "import")
        .map(|(i, _)| Spot::of(source, i, "import".len()))
        .collect()
}

/// What a successful script run left behind.
#[derive(Debug, Clone)]
pub struct ScriptRun {
    pub vars: Vars,
    pub contact: Dynamic,
    pub effects: ScriptEffects,
}

fn runtime_error(e: &EvalAltResult, limits: Limits) -> ScriptError {
    let pos = e.position();
    if let EvalAltResult::ErrorTerminated(_, _) = e {
        let message = format!(
            "the script ran longer than {} ms and was stopped (`limits.script_timeout`)",
            limits.timeout.as_millis()
        );
        return ScriptError {
            timed_out: true,
            ..ScriptError::at(message, pos)
        };
    }
    let message = match e {
        EvalAltResult::ErrorTooManyOperations(_) => format!(
            "the script ran more than {} operations and was stopped (an endless loop?)",
            limits.max_operations
        ),
        EvalAltResult::ErrorRuntime(value, _) => format!("the script threw: {value}"),
        other => other
            .to_string()
            .split(" (line ")
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    ScriptError::at(message, pos)
}

/// Turns a JSON value into a Rhai value (for stored variables and HTTP responses).
pub fn from_json(value: &serde_json::Value) -> Dynamic {
    rhai::serde::to_dynamic(value).unwrap_or(Dynamic::UNIT)
}

/// Turns a Rhai value into JSON (for storing variables).
pub fn to_json(value: &Dynamic) -> serde_json::Value {
    rhai::serde::from_dynamic(value).unwrap_or(serde_json::Value::Null)
}

/// Variables from their stored JSON object.
pub fn vars_from_json(value: &serde_json::Value) -> Vars {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.as_str().into(), from_json(v)))
            .collect(),
        _ => Vars::new(),
    }
}

/// Variables as a JSON object.
pub fn vars_to_json(vars: &Vars) -> serde_json::Value {
    serde_json::Value::Object(
        vars.iter()
            .map(|(k, v)| (k.to_string(), to_json(v)))
            .collect(),
    )
}

/// A shared handle, cheap to clone into every flow that compiles against it.
pub type SharedScripting = Arc<Scripting>;

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(vars: &'a Vars, contact: &'a Dynamic, message: &'a Dynamic) -> Context<'a> {
        Context {
            vars,
            contact,
            message,
            now: crate::clock::VirtualClock::test_epoch(),
            timezone: None,
        }
    }

    #[test]
    fn scripts_read_and_write_variables_and_reply() {
        let s = Scripting::default();
        let ast = s
            .compile_script("let total = qty * 2; _tmp = 1; reply(`total ${total}`); tag(\"vip\"); goto(\"done\");")
            .unwrap();
        let mut vars = Vars::new();
        vars.insert("qty".into(), Dynamic::from(21_i64));
        vars.insert("_tmp".into(), Dynamic::from(0_i64));
        let (contact, message) = (Dynamic::from_map(Map::new()), Dynamic::from_map(Map::new()));
        let run = s.run(&ast, &ctx(&vars, &contact, &message)).unwrap();
        assert_eq!(run.vars.get("total").unwrap().as_int().unwrap(), 42);
        assert!(!run.vars.contains_key("_tmp"));
        assert_eq!(
            run.effects.replies,
            vec![ScriptReply::Text("total 42".into())]
        );
        assert_eq!(run.effects.goto.as_deref(), Some("done"));
        assert_eq!(run.effects.tags, vec![(true, "vip".to_string())]);
    }

    #[test]
    fn goto_is_renamed_outside_strings_only() {
        assert_eq!(
            rename_goto("goto(\"a\"); reply(\"goto(x)\"); // goto(y)\nmy_goto(1)"),
            "jump(\"a\"); reply(\"goto(x)\"); // goto(y)\nmy_goto(1)"
        );
    }

    #[test]
    fn literal_gotos_and_imports_are_found_with_their_place() {
        let source = "// goto(\"comment\")\nlet a = \"goto(\\\"string\\\")\";\nif a { goto( \"next_step\" ); }\n  goto(name);\nimport \"x\" as y;";
        assert_eq!(
            literal_gotos(source),
            [(
                "next_step".to_string(),
                Spot {
                    line: 3,
                    col: 8,
                    len: "goto( \"next_step\" )".len()
                }
            )]
        );
        assert_eq!(
            imports(source),
            [Spot {
                line: 5,
                col: 1,
                len: 6
            }]
        );
        assert!(imports("let important = 1; // import").is_empty());
    }

    #[test]
    fn endless_loops_stop_with_their_position() {
        let s = Scripting::default();
        let ast = s
            .compile_script("let x = 0;\nloop {\n  x += 1;\n}")
            .unwrap();
        let vars = Vars::new();
        let unit = Dynamic::UNIT;
        let err = s.run(&ast, &ctx(&vars, &unit, &unit)).unwrap_err();
        assert!(
            err.message.contains("more than 100000 operations"),
            "{}",
            err.message
        );
        assert!(err.line.is_some());
    }

    /// Few operations, each heavy: far inside the operation budget, stopped by the clock.
    #[test]
    fn heavy_scripts_stop_at_the_time_limit() {
        let s = Scripting::new(Limits {
            timeout: Duration::from_millis(100),
            ..Limits::default()
        });
        let source = "let s = \"\";\ns.pad(60000, \"x\");\nlet n = 0;\nfor i in 0..30000 {\n  n += s.sub_string(1, 59000).len();\n}";
        let ast = s.compile_script(source).unwrap();
        let vars = Vars::new();
        let unit = Dynamic::UNIT;
        let started = Instant::now();
        let err = s.run(&ast, &ctx(&vars, &unit, &unit)).unwrap_err();
        println!("stopped after {:?}", started.elapsed());
        assert!(err.timed_out, "{}", err.message);
        assert!(
            err.message.contains("longer than 100 ms"),
            "{}",
            err.message
        );
        assert_eq!(err.line, Some(5), "stopped inside the loop");
        // Light scripts are untouched by the clock.
        let ast = s
            .compile_script("let x = 0; for i in 0..1000 { x += i; }")
            .unwrap();
        assert!(s.run(&ast, &ctx(&vars, &unit, &unit)).is_ok());
    }

    #[test]
    fn throws_and_type_errors_are_errors_not_panics() {
        let s = Scripting::default();
        let vars = Vars::new();
        let unit = Dynamic::UNIT;
        let ast = s.compile_script("\nthrow \"no stock\";").unwrap();
        let err = s.run(&ast, &ctx(&vars, &unit, &unit)).unwrap_err();
        assert_eq!(err.message, "the script threw: no stock");
        assert_eq!(err.line, Some(2));
        let ast = s.compile_expression("1 + \"a\" * 2").unwrap();
        assert!(s.eval(&ast, &ctx(&vars, &unit, &unit)).is_err());
    }

    #[test]
    fn imports_and_eval_are_refused() {
        let s = Scripting::default();
        let vars = Vars::new();
        let unit = Dynamic::UNIT;
        let ast = s.compile_script("import \"/etc/passwd\" as p;").unwrap();
        assert!(s.run(&ast, &ctx(&vars, &unit, &unit)).is_err());
        assert!(s.compile_script("eval(\"1\")").is_err());
    }

    #[test]
    fn huge_strings_hit_the_limit() {
        let s = Scripting::default();
        let vars = Vars::new();
        let unit = Dynamic::UNIT;
        let ast = s
            .compile_script("let s = \"x\"; for i in 0..100 { s += s; }")
            .unwrap();
        assert!(s.run(&ast, &ctx(&vars, &unit, &unit)).is_err());
    }

    #[test]
    fn unset_variables_read_as_unit() {
        let s = Scripting::default();
        let vars = Vars::new();
        let unit = Dynamic::UNIT;
        let ast = s.compile_expression("order_id == ()").unwrap();
        assert!(s.eval_condition(&ast, &ctx(&vars, &unit, &unit)).unwrap());
    }

    #[test]
    fn conditions_must_be_booleans() {
        let s = Scripting::default();
        let vars = Vars::new();
        let unit = Dynamic::UNIT;
        let ast = s.compile_expression("42").unwrap();
        let err = s
            .eval_condition(&ast, &ctx(&vars, &unit, &unit))
            .unwrap_err();
        assert!(err.message.contains("true or false"));
    }

    #[test]
    fn json_round_trip() {
        let json = serde_json::json!({"a": 1, "b": "x", "c": [true, null], "d": {"e": 1.5}});
        assert_eq!(vars_to_json(&vars_from_json(&json)), json);
    }
}
