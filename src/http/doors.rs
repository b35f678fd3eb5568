//! Who may use the two doors that are neither a webhook nor `/api`: the sandbox
//! (`POST /sandbox/messages`, which runs flows, scripts and `http` steps for its caller) and
//! `/metrics`. Decided once, from the config and the address the server listens on, by
//! [`Doors::decide`] (a pure function, so the rule is tested with addresses as values), and
//! said at start-up by [`Doors::describe`].
//!
//! The rule: a loopback listener is this machine's own, so both doors are open there as they
//! always were, unless the config says otherwise. The sandbox follows `sandbox:` (`token`,
//! the default, asks a non-loopback listener's callers for the admin token, with the same
//! check as `/api`; `public` is open; `off` is closed everywhere). `/metrics` asks for
//! `metrics.token` when one is set, on any listener; without one it is open on a loopback
//! listener and asks for the admin token on any other. A non-loopback listener
//! always has an admin token (`app::Application::build` refuses to start without one), so
//! nothing opens to the network unless the config says `sandbox: public`.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;

use super::bearer;
use crate::config::{Config, SandboxAccess};
use crate::yaml::Secret;

/// One door's rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Door {
    /// Anyone who reaches the listener.
    Open,
    /// `Authorization: Bearer <token>`; `key` names the config key that holds it.
    Bearer { token: Secret, key: &'static str },
    /// Closed: answered 404 with `why`.
    Closed { why: &'static str },
}

/// The rules of the sandbox and `/metrics` for one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doors {
    pub sandbox: Door,
    pub metrics: Door,
}

impl Doors {
    /// The rules for `config` on a server listening on `listener`.
    pub fn decide(config: &Config, listener: SocketAddr) -> Self {
        let loopback = listener.ip().is_loopback();
        let admin = config
            .admin
            .token
            .clone()
            .filter(|t| !t.expose().is_empty())
            .map(|token| Door::Bearer {
                token,
                key: "admin.token",
            });
        // Without an admin token only a loopback listener starts; closed otherwise, so a
        // caller that skipped that check still opens nothing.
        let local_or_admin = if loopback {
            Door::Open
        } else {
            admin.unwrap_or(Door::Closed {
                why: "needs an admin token, and none is configured",
            })
        };
        let sandbox = match config.sandbox {
            SandboxAccess::Off => Door::Closed {
                why: "the sandbox is off (`sandbox: off` in the config)",
            },
            SandboxAccess::Public => Door::Open,
            SandboxAccess::Token => local_or_admin.clone(),
        };
        let metrics = match config.metrics.token.clone() {
            Some(token) if !token.expose().is_empty() => Door::Bearer {
                token,
                key: "metrics.token",
            },
            _ => local_or_admin,
        };
        Self { sandbox, metrics }
    }

    /// One line per door for the start-up banner, e.g. `sandbox: needs the admin.token`.
    pub fn describe(&self) -> Vec<String> {
        let line = |name: &str, door: &Door| match door {
            Door::Open => format!("{name}: open to anyone who reaches the listener"),
            Door::Bearer { key, .. } => format!("{name}: needs `Authorization: Bearer <{key}>`"),
            Door::Closed { why } => format!("{name}: closed ({why})"),
        };
        vec![
            line("sandbox", &self.sandbox),
            line("metrics", &self.metrics),
        ]
    }
}

/// Middleware: lets a request through `door`, or answers why not.
pub async fn guard(State(door): State<Door>, request: Request, next: Next) -> Response {
    match &door {
        Door::Open => next.run(request).await,
        Door::Bearer { token, key } => match bearer(request.headers(), token, key) {
            Ok(()) => next.run(request).await,
            Err(refused) => *refused,
        },
        Door::Closed { why } => super::error(StatusCode::NOT_FOUND, "closed", *why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::from_str("flowgate.yaml", text, Path::new("")).unwrap()
    }

    fn at(addr: &str) -> SocketAddr {
        addr.parse().unwrap()
    }

    fn bearer(key: &'static str, token: &str) -> Door {
        Door::Bearer {
            token: Secret::new(token),
            key,
        }
    }

    #[test]
    fn a_public_listener_asks_for_the_admin_token_by_default() {
        let c = config("admin:\n  token: sesame\n");
        for listener in ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080"] {
            let doors = Doors::decide(&c, at(listener));
            assert_eq!(doors.sandbox, bearer("admin.token", "sesame"), "{listener}");
            assert_eq!(doors.metrics, bearer("admin.token", "sesame"), "{listener}");
        }
    }

    #[test]
    fn loopback_without_a_token_is_open_as_before() {
        for listener in ["127.0.0.1:8080", "[::1]:8080"] {
            let doors = Doors::decide(&config(""), at(listener));
            assert_eq!(doors.sandbox, Door::Open);
            assert_eq!(doors.metrics, Door::Open);
        }
        // An admin token changes nothing on loopback.
        let doors = Doors::decide(&config("admin:\n  token: sesame\n"), at("127.0.0.1:80"));
        assert_eq!(doors.sandbox, Door::Open);
        assert_eq!(doors.metrics, Door::Open);
    }

    #[test]
    fn the_config_opens_closes_and_gives_metrics_its_own_token() {
        let c = config("admin:\n  token: sesame\nsandbox: public\nmetrics:\n  token: scrape\n");
        let doors = Doors::decide(&c, at("0.0.0.0:8080"));
        assert_eq!(doors.sandbox, Door::Open);
        assert_eq!(doors.metrics, bearer("metrics.token", "scrape"));
        let doors = Doors::decide(&c, at("127.0.0.1:8080"));
        assert_eq!(doors.metrics, bearer("metrics.token", "scrape"));

        let doors = Doors::decide(&config("sandbox: off\n"), at("127.0.0.1:8080"));
        assert!(matches!(doors.sandbox, Door::Closed { .. }));
        assert!(doors.describe()[0].starts_with("sandbox: closed"));
    }

    #[test]
    fn a_public_listener_without_any_token_opens_nothing() {
        let doors = Doors::decide(&config(""), at("0.0.0.0:8080"));
        assert!(matches!(doors.sandbox, Door::Closed { .. }));
        assert!(matches!(doors.metrics, Door::Closed { .. }));
    }
}
