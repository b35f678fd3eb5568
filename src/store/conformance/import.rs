//! Contacts imported in bulk: created, merged with existing contacts by the identity rules,
//! idempotent, in chunks.

use chrono::{DateTime, Utc};

use super::with_pool;
use crate::clock::VirtualClock;
use crate::contacts_import::csv::{ImportRow, parse};
use crate::store::{Db, IMPORT_CHUNK, Identifiers, ImportOutcome};

const CH: &str = "main";
const PHONE: &str = "15555550123";
const BSUID: &str = "US.20000000000000000123";

fn now() -> DateTime<Utc> {
    VirtualClock::test_epoch()
}

fn rows(csv: &str) -> Vec<ImportRow> {
    let parsed = parse(csv.as_bytes()).unwrap();
    assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
    parsed.rows
}

async fn import(db: &Db, csv: &str) -> Vec<ImportOutcome> {
    db.import_contacts(CH, &rows(csv), now()).await.unwrap()
}

/// The key of the contact a webhook with these identifiers finds.
async fn resolve(db: &Db, phone: Option<&str>, bsuid: Option<&str>) -> String {
    db.resolve_contact(CH, Identifiers::new(phone, bsuid), now())
        .await
        .unwrap()
        .unwrap()
        .key
}

/// A contact's profile as stored: (name, tags JSON, attrs JSON, timezone).
type StoredProfile = (Option<String>, String, String, Option<String>);

async fn profile(db: &Db, key: &str) -> StoredProfile {
    with_pool!(db, |pool| sqlx::query_as(
        "SELECT name, tags, attrs, timezone FROM contacts WHERE channel = $1 AND wa_id = $2"
    )
    .bind(CH)
    .bind(key)
    .fetch_one(pool)
    .await
    .unwrap())
}

/// Every contact of the channel as (key, its aliases, comma-separated).
async fn identities(db: &Db) -> Vec<(String, String)> {
    let rows: Vec<(String, Option<String>)> = with_pool!(db, |pool| sqlx::query_as(
        "SELECT c.wa_id, a.identifier FROM contacts c \
            LEFT JOIN contact_aliases a ON a.contact_id = c.id \
         WHERE c.channel = $1 ORDER BY c.wa_id, a.identifier"
    )
    .bind(CH)
    .fetch_all(pool)
    .await
    .unwrap());
    let mut out: Vec<(String, String)> = Vec::new();
    for (key, alias) in rows {
        if out.last().is_none_or(|(last, _)| *last != key) {
            out.push((key, String::new()));
        }
        if let (Some(alias), Some((_, aliases))) = (alias, out.last_mut()) {
            if !aliases.is_empty() {
                aliases.push(',');
            }
            aliases.push_str(&alias);
        }
    }
    out
}

/// A contact as a turn creates it: keyed by `wa_id`, with a profile.
async fn seed(db: &Db, wa_id: &str, tags: &str, attrs: &str) {
    with_pool!(db, |pool| sqlx::query(
        "INSERT INTO contacts (channel, wa_id, name, tags, attrs, created_at, updated_at) \
         VALUES ($1, $2, 'Old Name', $3, $4, 0, 0)"
    )
    .bind(CH)
    .bind(wa_id)
    .bind(tags)
    .bind(attrs)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected());
}

pub async fn an_import_creates_contacts_and_again_changes_nothing(db: Db) {
    let csv = format!(
        "wa_id,bsuid,name,tags,attr.city,timezone\n\
         {PHONE},,Ada,vip;customers,Berlin,Europe/Berlin\n\
         ,US.20000000000000000999,Bob,,,\n\
         15555550124,{BSUID},Cy,,,\n"
    );
    use ImportOutcome::*;
    assert_eq!(import(&db, &csv).await, [Created, Created, Created]);
    assert_eq!(
        identities(&db).await,
        [
            (PHONE.to_string(), String::new()),
            ("15555550124".to_string(), BSUID.to_string()),
            ("US.20000000000000000999".to_string(), String::new()),
        ]
    );
    assert_eq!(
        profile(&db, PHONE).await,
        (
            Some("Ada".into()),
            r#"["customers","vip"]"#.into(),
            r#"{"city":"Berlin"}"#.into(),
            Some("Europe/Berlin".into())
        )
    );
    // The pairing is a webhook's: the BSUID alone finds the phone's contact.
    assert_eq!(resolve(&db, None, Some(BSUID)).await, "15555550124");

    assert_eq!(import(&db, &csv).await, [Unchanged, Unchanged, Unchanged]);
    assert_eq!(identities(&db).await.len(), 3);
}

pub async fn an_import_merges_into_the_contact_an_identifier_names(db: Db) {
    seed(
        &db,
        PHONE,
        r#"["old"]"#,
        r#"{"city":"Paris","plan":"gold"}"#,
    )
    .await;
    // A webhook pairs the phone with its BSUID (an alias).
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, PHONE);

    let csv = format!("bsuid,tags,attr.city,timezone\n{BSUID},new;old,Berlin,Asia/Tokyo\n");
    assert_eq!(import(&db, &csv).await, [ImportOutcome::Updated]);
    assert_eq!(
        profile(&db, PHONE).await,
        (
            Some("Old Name".into()),
            r#"["new","old"]"#.into(),
            r#"{"city":"Berlin","plan":"gold"}"#.into(),
            Some("Asia/Tokyo".into())
        ),
        "tags added, attributes merged (the file wins), the name kept"
    );
    assert_eq!(identities(&db).await.len(), 1, "no second contact");
}

pub async fn a_row_with_both_identifiers_pairs_them(db: Db) {
    seed(&db, PHONE, "[]", "{}").await;
    seed(&db, BSUID, "[]", "{}").await;
    let csv = format!("wa_id,bsuid\n{PHONE},US.20000000000000000555\n15555550999,{BSUID}\n");
    assert_eq!(
        import(&db, &csv).await,
        [ImportOutcome::Updated, ImportOutcome::Updated]
    );
    // A phone contact learnt its BSUID; a BSUID contact is keyed by the phone it shares,
    // as a webhook with both would have done.
    assert_eq!(
        identities(&db).await,
        [
            (PHONE.to_string(), "US.20000000000000000555".to_string()),
            ("15555550999".to_string(), BSUID.to_string()),
        ]
    );
    assert_eq!(resolve(&db, None, Some(BSUID)).await, "15555550999");
    assert_eq!(
        import(&db, &csv).await,
        [ImportOutcome::Unchanged, ImportOutcome::Unchanged]
    );
}

pub async fn a_row_naming_two_contacts_is_reported_not_merged(db: Db) {
    seed(&db, PHONE, r#"["a"]"#, "{}").await;
    seed(&db, BSUID, r#"["b"]"#, "{}").await;
    let before = identities(&db).await;
    let csv = format!("wa_id,bsuid,tags\n{PHONE},{BSUID},merged\n15555550124,,ok\n");
    let outcomes = import(&db, &csv).await;
    let ImportOutcome::Conflict(why) = &outcomes[0] else {
        panic!("{outcomes:?}");
    };
    assert!(why.contains(PHONE) && why.contains(BSUID), "{why}");
    assert!(!why.contains("answers"), "no webhook wording: {why}");
    assert_eq!(outcomes[1], ImportOutcome::Created, "the rest are imported");
    assert_eq!(profile(&db, PHONE).await.1, r#"["a"]"#, "nothing written");
    assert_eq!(profile(&db, BSUID).await.1, r#"["b"]"#);
    assert_eq!(identities(&db).await.len(), before.len() + 1);
}

pub async fn a_pairing_the_process_remembered_otherwise_is_seen_at_once(db: Db) {
    seed(&db, BSUID, "[]", "{}").await;
    // Resolved without a write: remembered in memory.
    assert_eq!(resolve(&db, None, Some(BSUID)).await, BSUID);
    let csv = format!("wa_id,bsuid\n{PHONE},{BSUID}\n");
    assert_eq!(import(&db, &csv).await, [ImportOutcome::Updated]);
    assert_eq!(resolve(&db, None, Some(BSUID)).await, PHONE);
}

pub async fn a_large_import_is_written_in_chunks_in_file_order(db: Db) {
    let n = IMPORT_CHUNK * 2 + 500;
    let mut csv = String::from("wa_id,tags\n");
    for i in 0..n {
        csv.push_str(&format!("4930{:08},t{}\n", i % (n - 100), i));
    }
    let outcomes = import(&db, &csv).await;
    assert_eq!(outcomes.len(), n);
    let created = outcomes
        .iter()
        .filter(|o| **o == ImportOutcome::Created)
        .count();
    // The last 100 rows repeat the first 100 contacts, in a later chunk: updated.
    assert_eq!(created, n - 100);
    assert!(
        outcomes[n - 100..]
            .iter()
            .all(|o| *o == ImportOutcome::Updated)
    );
    assert_eq!(
        profile(&db, "493000000000").await.1,
        format!(r#"["t0","t{}"]"#, n - 100)
    );
    assert_eq!(identities(&db).await.len(), n - 100);
}
