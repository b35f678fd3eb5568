//! What falls due by the clock: queued messages whose `queue_ttl` ran out, and timers
//! (`wait`, an `ask`'s timeout), each fired as a turn of its own.

use chrono::{DateTime, Utc};

use crate::clock::VirtualClock;
use crate::engine::{Event, TimerKind};
use crate::store::{LeaseKey, TimerRow};

use super::{DispatchError, Runtime, SentMessage, TurnReport, count_decision};

impl Runtime {
    /// Expires every queued message whose `queue_ttl` ran out by the clock's now.
    pub async fn expire_queued(&self) -> Result<Vec<TurnReport>, DispatchError> {
        let now = self.clock.now();
        let mut reports = Vec::new();
        loop {
            let due = self.db.due_expiries(now, 100).await?;
            if due.is_empty() {
                return Ok(reports);
            }
            for m in due {
                let decision = self.policy.expired(m.queued_at, now);
                if self.db.expire_message(m.id, decision.reason(), now).await? {
                    count_decision(&decision, "expiry");
                    tracing::info!(channel = %m.channel, contact = %m.wa_id, message = m.id, "{}", decision.explain());
                    let sent = SentMessage {
                        id: m.id,
                        message: m.message,
                        decision,
                    };
                    reports.push(TurnReport::one_message(m.wa_id, sent));
                }
            }
        }
    }

    /// Fires every timer due by the clock's now, oldest first. On a shared database a
    /// timer fires only under its contact's lease, and only if it is still pending once the
    /// lease is taken (another instance may have fired it since it was read); a timer whose
    /// contact another instance holds waits for the next call.
    pub async fn fire_due_timers(&self) -> Result<Vec<TurnReport>, DispatchError> {
        let mut reports = self.expire_queued().await?;
        loop {
            let due = self.db.due_timers(self.clock.now(), 100).await?;
            let mut fired = 0;
            for timer in &due {
                let lease = match &self.ownership {
                    Some(ownership) => {
                        let lease = LeaseKey::new(&timer.channel, &timer.wa_id);
                        if !ownership.acquire(&lease).await? {
                            continue;
                        }
                        if !self.db.timer_pending(timer.id).await? {
                            ownership.release(&lease).await;
                            continue;
                        }
                        Some((ownership, lease))
                    }
                    None => None,
                };
                let report = self.fire_timer(timer).await;
                if let Some((ownership, lease)) = lease {
                    ownership.release(&lease).await;
                }
                reports.push(report?);
                fired += 1;
            }
            if fired == 0 {
                return Ok(reports);
            }
        }
    }

    /// One timer's turn.
    async fn fire_timer(&self, timer: &TimerRow) -> Result<TurnReport, DispatchError> {
        let kind: TimerKind = match serde_json::from_value(timer.payload.clone()) {
            Ok(kind) => kind,
            Err(e) => {
                tracing::error!(timer = timer.id, error = %e, "unreadable timer; dropping it");
                TimerKind::Wait { epoch: -1 }
            }
        };
        self.handle(
            &timer.channel,
            &timer.wa_id,
            Event::Timer(kind),
            None,
            None,
            Some(timer.id),
        )
        .await
    }

    /// Moves a virtual clock to `to`, firing every timer that falls due on the way at its
    /// own time, in time order (`/wait` in `chat`, `wait:` in conversation tests).
    pub async fn advance_clock(
        &self,
        clock: &VirtualClock,
        to: DateTime<Utc>,
    ) -> Result<Vec<TurnReport>, DispatchError> {
        let mut reports = Vec::new();
        while let Some(due) = self.next_timer_at().await? {
            if due > to {
                break;
            }
            clock.advance_to(due);
            reports.extend(self.fire_due_timers().await?);
        }
        clock.advance_to(to);
        Ok(reports)
    }

    /// The next time something is due: a timer or a queued message's expiry.
    pub async fn next_timer_at(&self) -> Result<Option<DateTime<Utc>>, DispatchError> {
        let timer = self.db.next_timer_at().await?;
        let expiry = self.db.next_expiry_at().await?;
        Ok(timer.into_iter().chain(expiry).min())
    }
}
