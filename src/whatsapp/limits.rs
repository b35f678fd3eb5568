//! A number's messaging limit as the Graph API states it: how many unique customers the
//! business may reach with business-initiated (template) messages in a rolling 24 h.
//!
//! WhatsApp sets the limit for the business portfolio (every number of it shares it) and
//! raises it as the business sends well: 250 for a new portfolio, then 2,000, 10,000,
//! 100,000 and unlimited. A number's node answers it in
//! `whatsapp_business_manager_messaging_limit` as a tier name (`TIER_250`, `TIER_2K`,
//! `TIER_10K`, `TIER_100K`, `TIER_UNLIMITED`); the older `messaging_limit_tier` field is
//! deprecated and not read.

use serde_json::Value;

use super::errors::GraphError;
use super::send::read_answer;

/// The field of a phone number's node that holds its limit.
pub const MESSAGING_LIMIT_FIELD: &str = "whatsapp_business_manager_messaging_limit";

/// A messaging limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessagingLimit {
    /// At most this many unique business-initiated recipients in 24 h.
    Recipients(u32),
    Unlimited,
}

impl MessagingLimit {
    /// The tighter of this limit and `configured` (a config key the operator set): what a
    /// campaign may spend.
    pub fn with_configured(self, configured: Option<u32>) -> Option<u32> {
        match (self, configured) {
            (Self::Recipients(n), Some(c)) => Some(n.min(c)),
            (Self::Recipients(n), None) => Some(n),
            (Self::Unlimited, c) => c,
        }
    }
}

/// A tier name: `TIER_250` is 250, `TIER_2K` 2,000, `TIER_1M` 1,000,000, `TIER_UNLIMITED`
/// unlimited; `None` for anything else.
pub fn parse_tier(tier: &str) -> Option<MessagingLimit> {
    let rest = tier.trim().strip_prefix("TIER_")?;
    if rest == "UNLIMITED" {
        return Some(MessagingLimit::Unlimited);
    }
    let (digits, factor) = match rest.as_bytes().last()? {
        b'K' => (&rest[..rest.len() - 1], 1_000),
        b'M' => (&rest[..rest.len() - 1], 1_000_000),
        _ => (rest, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    n.checked_mul(factor).map(MessagingLimit::Recipients)
}

/// The answer to `GET /{phone_number_id}?fields=whatsapp_business_manager_messaging_limit`.
pub fn parse_messaging_limit_response(
    status: u16,
    body: &[u8],
) -> Result<MessagingLimit, GraphError> {
    let json = read_answer(status, body)?;
    let tier = json.get(MESSAGING_LIMIT_FIELD).and_then(Value::as_str);
    tier.and_then(parse_tier).ok_or_else(|| {
        GraphError::http(
            status,
            format!(
                "the phone number's `{MESSAGING_LIMIT_FIELD}` is {}, not a tier flowgate knows \
                 (TIER_250, TIER_2K, TIER_10K, TIER_100K, TIER_UNLIMITED)",
                tier.map_or("missing".to_string(), |t| format!("`{t}`"))
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_read_as_recipients() {
        let cases = [
            ("TIER_250", Some(MessagingLimit::Recipients(250))),
            ("TIER_2K", Some(MessagingLimit::Recipients(2_000))),
            ("TIER_10K", Some(MessagingLimit::Recipients(10_000))),
            ("TIER_100K", Some(MessagingLimit::Recipients(100_000))),
            ("TIER_1M", Some(MessagingLimit::Recipients(1_000_000))),
            ("TIER_UNLIMITED", Some(MessagingLimit::Unlimited)),
            ("TIER_", None),
            ("TIER_K", None),
            ("TIER_2KK", None),
            ("TIER_-1", None),
            ("TIER_99999999K", None),
            ("250", None),
        ];
        for (tier, expected) in cases {
            assert_eq!(parse_tier(tier), expected, "{tier}");
        }
    }

    #[test]
    fn the_tighter_of_whatsapps_and_the_configured_limit_wins() {
        let two_k = MessagingLimit::Recipients(2_000);
        assert_eq!(two_k.with_configured(None), Some(2_000));
        assert_eq!(two_k.with_configured(Some(500)), Some(500));
        assert_eq!(two_k.with_configured(Some(9_000)), Some(2_000));
        assert_eq!(MessagingLimit::Unlimited.with_configured(None), None);
        assert_eq!(MessagingLimit::Unlimited.with_configured(Some(7)), Some(7));
    }

    #[test]
    fn an_answer_gives_its_tier_or_says_what_is_wrong() {
        let body = br#"{"whatsapp_business_manager_messaging_limit":"TIER_10K","id":"1"}"#;
        assert_eq!(
            parse_messaging_limit_response(200, body).unwrap(),
            MessagingLimit::Recipients(10_000)
        );
        let odd = parse_messaging_limit_response(200, br#"{"id":"1"}"#).unwrap_err();
        assert!(odd.to_string().contains("is missing"), "{odd}");
        let refused = br#"{"error":{"message":"Invalid OAuth access token","type":"OAuthException","code":190}}"#;
        assert_eq!(
            parse_messaging_limit_response(401, refused)
                .unwrap_err()
                .code,
            190
        );
    }
}
