//! Two lints over compiled flows: loops that send without waiting (an error), and the
//! window lint.
//!
//! **Loops that send.** Steps that lead to each other unconditionally and never wait for the
//! customer (`a: {say: a, next: b}`, `b: {say: b, next: a}`) would send a message per step
//! until the turn's cap stops them with the apology: [`sending_loops`] reports each such cycle
//! with its steps and where they are written. Followed: `next`/`goto` to a step and a first
//! branch without a condition. Waiting ends the loop: an `ask`, reply branches, a `wait`, a
//! `handoff`. Not followed (the turn's cap is the guard there): branches with `if:`, a
//! script's `goto` (which a script takes conditionally, as a rule), `on_error`, and `flow:`
//! jumps to other flows.
//!
//! **The window lint**: a warning for each step that can send a free-form message
//! after the customer's window has closed and has no `outside_window` template to fall back
//! on. At run time the policy layer queues such a message until the customer writes again;
//! `check` says so while the flow is still being written.
//!
//! The analysis is pure and runs over every compiled flow at once, because `flow:` jumps carry
//! the delay into another flow. For each step it bounds how long after the customer's last
//! message the step's action can run:
//!
//! - a customer message resets the clock: a flow started by a trigger, the steps after an
//!   `ask` is answered, after a reply branch matched, after `on_fail` (a failed answer is a
//!   message too);
//! - a `wait: D` adds `D` before the step's own action; an `ask`'s `timeout: D` adds `D` on the
//!   way to its `on_timeout` step; `wait: { until: … }` adds an unknown delay;
//! - everything else passes the bound on unchanged: `next`, `goto`, branches that only test
//!   `if`, a script's literal `goto("…")`, `on_error`, `flow:` (to that flow's start step), and
//!   an `http` step (its timeout is seconds, not hours).
//!
//! The bound is the longest such path, so a delay reached by two routes takes the later one,
//! and waits add up along a path (`wait: 12h` then `wait: 13h` closes a 24 h window). A step is
//! outside the window when its bound reaches `window - safety_margin` (the policy treats the
//! window as closed that early), and may be outside when an unknown delay leads to it.
//!
//! Warned there: a `say` or an `ask`'s question without `outside_window`, and a script step
//! whose source calls `reply`/`reply_buttons` (script replies have no template fallback).
//! Not warned: `template` steps (always allowed), steps with `outside_window`, and steps that
//! send nothing. One warning per step, at its message, naming the first cause found.
//!
//! Not linted, because the flow alone does not say when they run: a flow started by the API
//! or an agent (`Event::Start`, or a resume naming a flow). A handoff step's way on (which a
//! resume without a flow takes) follows an unknown delay; its `on_timeout` follows the
//! handoff's `timeout`. The engine's own apology after a failure is not a step's
//! message and is not linted either. A campaign's `on_reply` flow comes in as an [`Entry`]:
//! the recipient's reply starts it, so it starts with no delay, and its steps after a long
//! `wait` are hazards like any other step's.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::Duration;

use super::{Action, Cond, Flow, Route, Step, Target, Wait};
use crate::config::PolicyConfig;
use crate::diagnostic::Diagnostic;

/// The window as the policy applies it (open while `now < last customer message + window -
/// safety_margin`), and the policy-level templates that
/// cover steps without their own `outside_window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// How long after the customer's last message free-form messages are accepted.
    pub length: Duration,
    /// The window counts as closed this long before it ends.
    pub safety_margin: Duration,
    /// The scopes of `policy.outside_window` rules: (flow, origin), `None` matching any.
    pub fallbacks: Vec<(Option<String>, Option<String>)>,
}

impl Window {
    pub fn from_policy(policy: &PolicyConfig) -> Self {
        Self {
            length: policy.window.0,
            safety_margin: policy.safety_margin.0,
            fallbacks: policy
                .outside_window
                .iter()
                .map(|r| (r.flow.clone(), r.origin.clone()))
                .collect(),
        }
    }

    /// Whether a policy-level rule gives messages of `flow` from `origin` (`step`, `script`)
    /// a template fallback.
    fn covers(&self, flow: &str, origin: &str) -> bool {
        self.fallbacks.iter().any(|(f, o)| {
            f.as_deref().is_none_or(|f| f == flow) && o.as_deref().is_none_or(|o| o == origin)
        })
    }

    /// How long after the customer's last message the policy stops sending free-form text.
    fn closes_after(&self) -> Duration {
        self.length - self.safety_margin
    }
}

/// Where a step can be entered with a known delay since the customer's last message, besides
/// the flows' own structure (a flow's start is entered right after the message that
/// triggered it). Campaigns add their `on_reply` flows here
/// (`campaign::compile::reply_entries`), entered by the recipient's reply: no delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub flow: String,
    /// The longest time between the customer's last message and the flow's start.
    pub after: Duration,
    /// How the warning names the cause, e.g. "campaign `spring_sale`'s `on_reply`".
    pub via: String,
}

/// An error for each loop of steps that runs and sends without waiting for the customer.
pub fn sending_loops(flows: &[Arc<Flow>]) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    for flow in flows {
        // 0: not seen, 1: on the current path, 2: done.
        let mut state = vec![0u8; flow.steps.len()];
        for first in 0..flow.steps.len() {
            let mut path = Vec::new();
            let mut at = Some(first);
            while let Some(i) = at.filter(|&i| state[i] == 0) {
                state[i] = 1;
                path.push(i);
                at = straight_on(&flow.steps[i]);
            }
            if let Some(i) = at.filter(|&i| state[i] == 1) {
                let cycle = &path[path.iter().position(|&p| p == i).expect("on the path")..];
                if cycle.iter().any(|&s| sends(&flow.steps[s])) {
                    errors.push(loop_error(flow, cycle));
                }
            }
            for p in path {
                state[p] = 2;
            }
        }
    }
    errors
}

/// Where a step goes on without waiting and without a condition, within its flow.
fn straight_on(step: &Step) -> Option<usize> {
    if step.wait.is_some() || step.handoff.is_some() || step.awaits_reply() {
        return None;
    }
    let target = match &step.route {
        Route::Goto(t) => t,
        Route::Branches(b) if matches!(b.first()?.cond, Cond::Always) => &b[0].target,
        _ => return None,
    };
    match target {
        Target::Step(s) => Some(*s),
        Target::Flow(_) => None,
    }
}

/// Whether the step's action sends a message.
fn sends(step: &Step) -> bool {
    match &step.action {
        Action::Say(_)
        | Action::Template(_)
        | Action::Location(_)
        | Action::Contacts(_)
        | Action::Form(_) => true,
        Action::Script(script) => script.replies,
        Action::None | Action::Ask(_) | Action::Http(_) => false,
    }
}

/// The error for one loop, at its first step in the file, naming every step and its place.
fn loop_error(flow: &Flow, cycle: &[usize]) -> Diagnostic {
    let first = cycle
        .iter()
        .position(|&s| s == *cycle.iter().min().expect("a loop has steps"))
        .expect("the smallest is in the loop");
    let order: Vec<usize> = cycle[first..]
        .iter()
        .chain(&cycle[..first])
        .copied()
        .collect();
    let names: Vec<String> = order
        .iter()
        .chain(order.first())
        .map(|&s| format!("`{}`", flow.steps[s].id))
        .collect();
    let places: Vec<String> = order
        .iter()
        .map(|&s| {
            let step = &flow.steps[s];
            format!(
                "`{}` at {}:{}:{}",
                step.id, flow.file, step.loc.line, step.loc.col
            )
        })
        .collect();
    let start = &flow.steps[order[0]];
    Diagnostic::error(
        &flow.file,
        Some(start.loc),
        format!(
            "steps {} loop without waiting for the customer and send messages: one message \
             would make them send until the turn's cap (`limits.messages_per_turn`) stops them",
            names.join(" → ")
        ),
    )
    .with_label("the loop starts here")
    .with_help(format!(
        "the loop: {}; end it with an `ask`, a `wait`, or an `if:` branch that leaves it",
        places.join(", ")
    ))
}

/// Warnings for every step that can send outside the window without a template fallback.
pub fn window_hazards(flows: &[Arc<Flow>], window: Window, entries: &[Entry]) -> Vec<Diagnostic> {
    let graph = Graph::new(flows);
    let late = graph.propagate(window.closes_after(), entries);
    let mut warnings = Vec::new();
    for (node, &(f, s)) in graph.nodes.iter().enumerate() {
        let step = &flows[f].steps[s];
        let (at_action, cause) = arrive(
            late[node].0,
            late[node].1.clone(),
            step_delay(step),
            (f, s),
            window.closes_after(),
        );
        if let Some(warning) = warning(flows, (f, s), at_action, cause.as_ref(), &window) {
            warnings.push(warning);
        }
    }
    warnings
}

/// How late a step can run, as far as the window cares. Ordered: a later value wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Late {
    /// At most this long after the customer's last message, still inside the window.
    Within(Duration),
    /// After an unknown delay (`wait: { until: … }`): the window may have closed.
    Maybe,
    /// Possibly at or after the point where the window is closed.
    Closed,
}

/// The delay that made a step late: where it is written and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cause {
    /// `(flow, step)` indices of the step with the delay; `None` for an [`Entry`].
    at: Option<(usize, usize)>,
    what: String,
    /// The whole time since the customer's last message, when earlier delays add to it.
    total: Option<Duration>,
}

/// A delay a step or an edge adds.
#[derive(Debug, Clone)]
enum Delay {
    None,
    For(Duration, String),
    Unknown(String),
}

/// The bound after `delay`, written at `at`, is added to `late`.
fn arrive(
    late: Late,
    cause: Option<Cause>,
    delay: Delay,
    at: (usize, usize),
    closes_after: Duration,
) -> (Late, Option<Cause>) {
    let fresh = |what: String, total: Option<Duration>| {
        Some(Cause {
            at: Some(at),
            what,
            total,
        })
    };
    match (late, delay) {
        (late, Delay::None) => (late, cause),
        // A delay that closes the window on its own is the nearest cause, whatever came before.
        (_, Delay::For(d, what)) if d >= closes_after => (Late::Closed, fresh(what, None)),
        (Late::Closed, _) => (Late::Closed, cause),
        (Late::Within(before), Delay::For(d, what)) => {
            let total = before + d;
            if total >= closes_after {
                let summed = (before > Duration::zero()).then_some(total);
                (Late::Closed, fresh(what, summed))
            } else {
                (Late::Within(total), None)
            }
        }
        (Late::Maybe, Delay::For(..)) => (Late::Maybe, cause),
        (Late::Within(_), Delay::Unknown(what)) => (Late::Maybe, fresh(what, None)),
        (Late::Maybe, Delay::Unknown(_)) => (Late::Maybe, cause),
    }
}

/// The step's own `wait`, which runs before its action.
fn step_delay(step: &Step) -> Delay {
    match &step.wait {
        None => Delay::None,
        Some(Wait::For(d)) => Delay::For(*d, format!("`wait: {}`", written(*d))),
        Some(Wait::Until(t)) => Delay::Unknown(format!("`wait: {{ until: \"{}\" }}`", t.raw)),
    }
}

/// Every step of every flow as one graph of the ways on that need no customer message.
struct Graph<'a> {
    flows: &'a [Arc<Flow>],
    /// `(flow, step)` of each node.
    nodes: Vec<(usize, usize)>,
    /// The node of each flow's first step.
    first: Vec<usize>,
    by_id: HashMap<&'a str, usize>,
}

impl<'a> Graph<'a> {
    fn new(flows: &'a [Arc<Flow>]) -> Self {
        let mut nodes = Vec::new();
        let mut first = Vec::new();
        for (f, flow) in flows.iter().enumerate() {
            first.push(nodes.len());
            nodes.extend((0..flow.steps.len()).map(|s| (f, s)));
        }
        let by_id = flows
            .iter()
            .enumerate()
            .map(|(f, flow)| (flow.id.as_str(), f))
            .collect();
        Self {
            flows,
            nodes,
            first,
            by_id,
        }
    }

    fn node(&self, flow: usize, step: usize) -> usize {
        self.first[flow] + step
    }

    fn start_of(&self, flow: &str) -> Option<usize> {
        let f = *self.by_id.get(flow)?;
        Some(self.node(f, self.flows[f].start))
    }

    /// Where the step's run goes on without waiting for the customer, with the delay on the
    /// way. After a reply (an `ask`'s answer, reply branches, `on_fail`) nothing is carried:
    /// the reply reopened the window.
    fn successors(&self, f: usize, step: &Step) -> Vec<(usize, Delay)> {
        let mut out = Vec::new();
        let to = |t: &Target| match t {
            Target::Step(s) => Some(self.node(f, *s)),
            Target::Flow(id) => self.start_of(id),
        };
        if let Some(e) = step.on_error {
            out.push((self.node(f, e), Delay::None));
        }
        if let Action::Ask(ask) = &step.action {
            if let (Some(timeout), Some(t)) = (ask.timeout, ask.on_timeout) {
                let what = format!("`timeout: {}`", written(timeout));
                out.push((self.node(f, t), Delay::For(timeout, what)));
            }
            return out;
        }
        if let Some(handoff) = &step.handoff {
            // A person may keep the conversation for any time before a resume or the timeout.
            if let (Some(timeout), Some(t)) = (handoff.timeout, handoff.on_timeout) {
                let what = format!("the handoff's `timeout: {}`", written(timeout));
                out.push((self.node(f, t), Delay::For(timeout, what)));
            }
            let resumed = || Delay::Unknown("a handoff (until a person resumes it)".into());
            match &step.route {
                Route::Goto(t) => out.extend(to(t).map(|n| (n, resumed()))),
                Route::Branches(bs) => out.extend(
                    bs.iter()
                        .filter_map(|b| to(&b.target))
                        .map(|n| (n, resumed())),
                ),
                Route::End => {}
            }
            return out;
        }
        if let Action::Script(script) = &step.action {
            out.extend(script.jumps.iter().map(|&s| (self.node(f, s), Delay::None)));
        }
        if step.awaits_reply() {
            return out;
        }
        match &step.route {
            Route::End => {}
            Route::Goto(t) => out.extend(to(t).map(|n| (n, Delay::None))),
            Route::Branches(branches) => out.extend(
                branches
                    .iter()
                    .filter_map(|b| to(&b.target))
                    .map(|n| (n, Delay::None)),
            ),
        }
        out
    }

    /// The latest each step can be entered (before its own `wait`), with the cause: a
    /// longest-path search from every step, where a path that keeps growing around a loop
    /// (a `wait` that can repeat without a reply) ends up closed.
    fn propagate(&self, closes_after: Duration, entries: &[Entry]) -> Vec<(Late, Option<Cause>)> {
        let n = self.nodes.len();
        let mut late: Vec<(Late, Option<Cause>)> = vec![(Late::Within(Duration::zero()), None); n];
        let mut hops = vec![0usize; n];
        for entry in entries {
            if let Some(node) = self.start_of(&entry.flow) {
                let cause = Cause {
                    at: None,
                    what: entry.via.clone(),
                    total: None,
                };
                late[node] = if entry.after >= closes_after {
                    (Late::Closed, Some(cause))
                } else {
                    (Late::Within(entry.after), None)
                };
            }
        }
        let mut queue: VecDeque<usize> = (0..n).collect();
        let mut queued = vec![true; n];
        while let Some(u) = queue.pop_front() {
            queued[u] = false;
            let (f, s) = self.nodes[u];
            let step = &self.flows[f].steps[s];
            let (at_action, cause) = arrive(
                late[u].0,
                late[u].1.clone(),
                step_delay(step),
                (f, s),
                closes_after,
            );
            for (v, delay) in self.successors(f, step) {
                let (mut value, mut why) =
                    arrive(at_action, cause.clone(), delay, (f, s), closes_after);
                if value <= late[v].0 {
                    continue;
                }
                hops[v] = hops[u] + 1;
                if hops[v] > n && matches!(value, Late::Within(_)) {
                    // Longer than any path without a loop: the delay repeats with no reply.
                    value = Late::Closed;
                    why = Some(Cause {
                        at: Some((f, s)),
                        what: "a loop of waits with no reply".into(),
                        total: None,
                    });
                }
                late[v] = (value, why);
                if !queued[v] {
                    queued[v] = true;
                    queue.push_back(v);
                }
            }
        }
        late
    }
}

/// The warning for step `s` of flow `f` if it sends free-form content at `late` with no fallback.
fn warning(
    flows: &[Arc<Flow>],
    (f, s): (usize, usize),
    late: Late,
    cause: Option<&Cause>,
    window: &Window,
) -> Option<Diagnostic> {
    let (Late::Closed | Late::Maybe, Some(cause)) = (late, cause) else {
        return None;
    };
    let step = &flows[f].steps[s];
    let flow = &flows[f];
    let sends = match &step.action {
        Action::Say(_)
        | Action::Ask(_)
        | Action::Location(_)
        | Action::Contacts(_)
        | Action::Form(_)
            if step.outside_window.is_none() && !window.covers(&flow.id, "step") =>
        {
            "its message"
        }
        Action::Script(script) if script.replies && !window.covers(&flow.id, "script") => {
            "a `reply` of its script"
        }
        _ => return None,
    };
    let own = cause.at == Some((f, s));
    let mut when = format!("after {}", cause.what);
    match cause.at {
        Some((f, s)) if !own => {
            let other = &flows[f];
            when.push_str(&format!(" in step `{}`", other.steps[s].id));
            if other.id != flow.id {
                when.push_str(&format!(" of flow `{}`", other.id));
            }
            when.push_str(" with no reply since");
        }
        None => when = format!("from {}", cause.what),
        _ => {}
    }
    if let Some(total) = cause.total {
        when.push_str(&format!(
            " (up to {} after the customer's last message)",
            written(total)
        ));
    }
    let length = written(window.length);
    let (verdict, fate) = match late {
        Late::Closed => ("is closed", "will be queued"),
        _ => ("may have closed", "would be queued"),
    };
    let message = format!(
        "step `{}` runs {when}, when the {length} window {verdict}: {sends} {fate}",
        step.id
    );
    let help = match step.action {
        Action::Script(_) => "a script's replies have no template fallback: send a `template` step instead, or they wait until the customer writes again".to_string(),
        _ => "add `outside_window: { template: NAME, language: LANG, params: [...] }` to send an approved template instead, or it will be queued until the customer writes again".to_string(),
    };
    Some(
        Diagnostic::warning(&flow.file, Some(step.action_loc), message)
            .with_label("no template fallback")
            .with_help(help),
    )
}

/// A duration as flows usually write it: whole days from two days up (`2d`, `7d`), else in
/// hours (`24h`, `26h`, `1h30m`), since `1d2h` reads badly next to a 24 h window.
fn written(d: Duration) -> String {
    let secs = d.num_seconds();
    if secs >= 2 * 86_400 && secs % 86_400 == 0 {
        return format!("{}d", secs / 86_400);
    }
    let parts = [
        ("h", secs / 3600),
        ("m", secs % 3600 / 60),
        ("s", secs % 60),
    ];
    let text: String = parts
        .iter()
        .filter(|(_, n)| *n != 0)
        .map(|(unit, n)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() { "0s".into() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::load::load_sources;
    use crate::script::Scripting;
    use crate::templates::Registry;

    const DAY: Window = Window {
        length: Duration::hours(24),
        safety_margin: Duration::minutes(2),
        fallbacks: Vec::new(),
    };

    fn flows(sources: &[&str], window: Window) -> (Vec<Arc<Flow>>, Vec<String>) {
        let sources: Vec<(String, String)> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("f{i}.yaml"), s.to_string()))
            .collect();
        let no_scripts = |name: &str| Err(format!("no script `{name}`"));
        let project = load_sources(
            &sources,
            &Scripting::default(),
            Registry::default(),
            &no_scripts,
            None,
            window,
        );
        assert!(!project.diagnostics.has_errors());
        let warnings = project
            .diagnostics
            .sorted()
            .iter()
            .map(|d| format!("{}: {}", d.position(), d.message))
            .collect();
        (project.flows, warnings)
    }

    fn waits(first: &str, second: &str) -> String {
        format!(
            "flow: w\nsteps:\n  a:\n    say: hi\n    next: b\n  b:\n    wait: {first}\n    next: c\n  c:\n    wait: {second}\n    say: later\n"
        )
    }

    #[test]
    fn waits_add_up_to_the_safety_margin() {
        let (_, warnings) = flows(&[&waits("12h", "11h58m")], DAY);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("up to 23h58m"), "{warnings:?}");
        let (_, warnings) = flows(&[&waits("12h", "11h57m")], DAY);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_policy_level_template_covers_the_flows_it_names() {
        let covered = |flow: Option<&str>, origin: Option<&str>| Window {
            fallbacks: vec![(flow.map(str::to_string), origin.map(str::to_string))],
            ..DAY
        };
        let source = waits("12h", "13h");
        for window in [covered(Some("w"), None), covered(None, Some("step"))] {
            let (_, warnings) = flows(&[&source], window);
            assert!(warnings.is_empty(), "{warnings:?}");
        }
        for window in [covered(Some("other"), None), covered(None, Some("agent"))] {
            let (_, warnings) = flows(&[&source], window);
            assert_eq!(warnings.len(), 1, "{warnings:?}");
        }
    }

    #[test]
    fn the_configured_window_decides() {
        let short = Window {
            length: Duration::hours(1),
            safety_margin: Duration::zero(),
            fallbacks: Vec::new(),
        };
        let (_, warnings) = flows(&[&waits("30m", "30m")], short);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("the 1h window is closed"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_wait_that_repeats_without_a_reply_closes_the_window() {
        let source =
            "flow: nag\nsteps:\n  nag:\n    wait: 6h\n    say: still there?\n    next: nag\n";
        let (_, warnings) = flows(&[source], DAY);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("a loop of waits"), "{warnings:?}");
    }

    #[test]
    fn a_time_of_day_may_close_the_window() {
        let source = "flow: t\nsteps:\n  a:\n    wait: { until: \"09:00\" }\n    say: morning\n";
        let (_, warnings) = flows(&[source], DAY);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("may have closed"), "{warnings:?}");
    }

    #[test]
    fn a_handoff_may_be_resumed_after_the_window() {
        // A resume runs the handoff step's `next` whenever the person gives the
        // conversation back; its `on_timeout` runs after the handoff's timeout.
        let source =
            "flow: h\nsteps:\n  a:\n    handoff: support\n    next: b\n  b:\n    say: back\n";
        let (_, warnings) = flows(&[source], DAY);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("may have closed"), "{warnings:?}");
        let source = "flow: h\nsteps:\n  a:\n    handoff: { queue: support, timeout: 26h, on_timeout: b }\n  b:\n    say: nobody came\n";
        let (_, warnings) = flows(&[source], DAY);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("26h"), "{warnings:?}");
    }

    #[test]
    fn an_entry_carries_its_delay_into_a_flow() {
        // The hook for flows entered from outside (a campaign's `on_reply` uses it with no delay).
        let (flows, _) = flows(&["flow: r\nsteps:\n  a:\n    say: hi\n"], DAY);
        let entry = Entry {
            flow: "r".into(),
            after: Duration::hours(30),
            via: "campaign `spring`'s `on_reply`".into(),
        };
        let warnings = window_hazards(&flows, DAY, &[entry]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].message.contains("runs from campaign `spring`"),
            "{}",
            warnings[0].message
        );
    }
}
