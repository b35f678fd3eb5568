//! Contacts: resolving a customer's identifiers to one contact, and identity changes.

use chrono::{DateTime, Utc};

use super::with_pool;
use crate::clock::VirtualClock;
use crate::store::contacts::{Link, Linked};
use crate::store::{Db, Identifiers, IdentityChanged, Resolved};

const CH: &str = "main";
const PHONE: &str = "15555550123";
const NEW_PHONE: &str = "15555550999";
const BSUID: &str = "US.20000000000000000123";
const NEW_BSUID: &str = "US.20000000000000000456";
const STRANGER: &str = "US.20000000000000000789";

fn now() -> DateTime<Utc> {
    VirtualClock::test_epoch()
}

fn ids<'a>(phone: Option<&'a str>, bsuid: Option<&'a str>) -> Identifiers<'a> {
    Identifiers::new(phone, bsuid)
}

async fn resolve(db: &Db, phone: Option<&str>, bsuid: Option<&str>) -> Resolved {
    db.resolve_contact(CH, ids(phone, bsuid), now())
        .await
        .unwrap()
        .expect("an identifier was given")
}

/// A `system` identity change, from `previous` to `new`.
async fn change(db: &Db, previous: Identifiers<'_>, new: Identifiers<'_>) -> IdentityChanged {
    db.change_identity(CH, previous, new, now()).await.unwrap()
}

fn key(key: &str) -> Resolved {
    Resolved {
        key: key.into(),
        conflict: None,
    }
}

/// A contact as a turn creates it: keyed by `wa_id`, no alias.
async fn contact(db: &Db, wa_id: &str) -> i64 {
    with_pool!(db, |pool| sqlx::query_scalar(
        "INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
         VALUES ($1, $2, 0, 0) RETURNING id",
    )
    .bind(CH)
    .bind(wa_id)
    .fetch_one(pool)
    .await
    .unwrap())
}

/// A contact's id and one of its identifiers.
type IdAndIdentifier = (i64, String);

/// Every contact of the channel: (id, key, aliases).
async fn contacts(db: &Db) -> Vec<(i64, String, Vec<String>)> {
    let (contacts, aliases): (Vec<IdAndIdentifier>, Vec<IdAndIdentifier>) =
        with_pool!(db, |pool| {
            let contacts =
                sqlx::query_as("SELECT id, wa_id FROM contacts WHERE channel = $1 ORDER BY id")
                    .bind(CH)
                    .fetch_all(pool)
                    .await
                    .unwrap();
            let aliases = sqlx::query_as(
                "SELECT contact_id, identifier FROM contact_aliases WHERE channel = $1 \
             ORDER BY identifier",
            )
            .bind(CH)
            .fetch_all(pool)
            .await
            .unwrap();
            (contacts, aliases)
        });
    contacts
        .into_iter()
        .map(|(id, key)| {
            let own = aliases.iter().filter(|(of, _)| *of == id);
            (id, key, own.map(|(_, alias)| alias.clone()).collect())
        })
        .collect()
}

pub(super) async fn a_new_customer_with_both_identifiers_is_found_by_either(db: Db) {
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
    let all = contacts(&db).await;
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].1.as_str(), all[0].2.as_slice()),
        (PHONE, &[BSUID.to_string()][..])
    );
    // A username hides the phone: the BSUID alone finds the same contact.
    assert_eq!(resolve(&db, None, Some(BSUID)).await, key(PHONE));
    assert_eq!(resolve(&db, Some(PHONE), None).await, key(PHONE));
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
    assert_eq!(contacts(&db).await, all, "nothing more written");
}

pub(super) async fn new_customers_with_one_identifier_are_left_to_their_turn(db: Db) {
    assert_eq!(resolve(&db, Some(PHONE), None).await, key(PHONE));
    assert_eq!(resolve(&db, Some(""), Some(BSUID)).await, key(BSUID));
    assert!(contacts(&db).await.is_empty());
    assert_eq!(
        db.resolve_contact(CH, ids(None, Some(" ")), now())
            .await
            .unwrap(),
        None
    );
}

pub(super) async fn a_phone_contact_learns_its_bsuid(db: Db) {
    let id = contact(&db, PHONE).await;
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
    assert_eq!(
        contacts(&db).await,
        [(id, PHONE.to_string(), vec![BSUID.to_string()])]
    );
    assert_eq!(resolve(&db, None, Some(BSUID)).await, key(PHONE));
}

pub(super) async fn a_bsuid_contact_that_shares_its_phone_is_keyed_by_it(db: Db) {
    let id = contact(&db, BSUID).await;
    // Remembered, then forgotten by the write below.
    assert_eq!(resolve(&db, None, Some(BSUID)).await, key(BSUID));
    // Replies go `to` the phone once it is known; the BSUID stays as an alias.
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
    assert_eq!(
        contacts(&db).await,
        [(id, PHONE.to_string(), vec![BSUID.to_string()])]
    );
    assert_eq!(resolve(&db, None, Some(BSUID)).await, key(PHONE));
}

pub(super) async fn two_contacts_of_one_customer_are_not_merged(db: Db) {
    let by_phone = contact(&db, PHONE).await;
    let by_bsuid = contact(&db, BSUID).await;
    let resolved = resolve(&db, Some(PHONE), Some(BSUID)).await;
    assert_eq!(resolved.key, BSUID, "the BSUID's contact answers");
    let conflict = resolved.conflict.expect("the conflict is reported");
    assert!(conflict.contains(&by_phone.to_string()), "{conflict}");
    assert!(conflict.contains(&by_bsuid.to_string()), "{conflict}");
    assert_eq!(
        contacts(&db).await,
        [
            (by_phone, PHONE.to_string(), vec![]),
            (by_bsuid, BSUID.to_string(), vec![])
        ]
    );
}

pub(super) async fn a_changed_number_becomes_the_key_and_the_old_one_is_forgotten(db: Db) {
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
    let id = contacts(&db).await[0].0;
    // `user_changed_number`: from the old phone, `system.wa_id` the new one.
    let changed = change(&db, ids(Some(PHONE), None), ids(Some(NEW_PHONE), None)).await;
    assert_eq!(
        changed,
        IdentityChanged::Changed {
            contact_id: id,
            key: NEW_PHONE.into()
        }
    );
    assert_eq!(
        contacts(&db).await,
        [(id, NEW_PHONE.to_string(), vec![BSUID.to_string()])]
    );
    assert_eq!(
        resolve(&db, Some(NEW_PHONE), Some(BSUID)).await,
        key(NEW_PHONE)
    );
    // Whoever gets the old number next is someone else.
    assert_eq!(resolve(&db, Some(PHONE), None).await, key(PHONE));
    assert_eq!(contacts(&db).await.len(), 1);
}

pub(super) async fn a_number_change_without_the_new_number_keys_the_contact_by_its_new_bsuid(
    db: Db,
) {
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(PHONE));
    let id = contacts(&db).await[0].0;
    // `user_changed_user_id`: the new number is not shared, only the new BSUID.
    let changed = change(&db, ids(None, Some(BSUID)), ids(None, Some(NEW_BSUID))).await;
    assert_eq!(
        changed,
        IdentityChanged::Changed {
            contact_id: id,
            key: NEW_BSUID.into()
        }
    );
    let ours = (id, NEW_BSUID.to_string(), vec![BSUID.to_string()]);
    assert_eq!(contacts(&db).await, std::slice::from_ref(&ours));
    for bsuid in [BSUID, NEW_BSUID] {
        assert_eq!(resolve(&db, None, Some(bsuid)).await, key(NEW_BSUID));
    }
    // The old number's next owner is someone else.
    assert_eq!(resolve(&db, Some(PHONE), Some(STRANGER)).await, key(PHONE));
    let all = contacts(&db).await;
    assert_eq!(all[0], ours);
    assert_eq!(all[1].1, PHONE);
}

pub(super) async fn a_late_webhook_with_the_old_identifiers_changes_nothing(db: Db) {
    resolve(&db, Some(PHONE), Some(BSUID)).await;
    change(
        &db,
        ids(Some(PHONE), Some(BSUID)),
        ids(Some(NEW_PHONE), Some(NEW_BSUID)),
    )
    .await;
    let after = contacts(&db).await;
    assert_eq!(after[0].1, NEW_PHONE);
    // Redelivered from before the change: it finds the contact by its old BSUID.
    assert_eq!(resolve(&db, Some(PHONE), Some(BSUID)).await, key(NEW_PHONE));
    assert_eq!(contacts(&db).await, after);
}

pub(super) async fn a_number_that_changed_hands_unannounced_gets_a_contact_of_its_own(db: Db) {
    resolve(&db, Some(PHONE), Some(BSUID)).await;
    let ours = contacts(&db).await[0].0;
    // Meta pairs the number with another BSUID: a BSUID is regenerated with every
    // number change, so this is the number's next owner (the change was never seen).
    assert_eq!(resolve(&db, Some(PHONE), Some(STRANGER)).await, key(PHONE));
    let all = contacts(&db).await;
    assert_eq!(all[0], (ours, BSUID.to_string(), vec![]), "ours, by BSUID");
    assert_eq!(all[1].1.as_str(), PHONE);
    assert_eq!(all[1].2, [STRANGER.to_string()]);
    assert_eq!(resolve(&db, None, Some(BSUID)).await, key(BSUID));
}

pub(super) async fn a_new_number_announced_without_its_bsuid_learns_it_from_the_next_message(
    db: Db,
) {
    resolve(&db, Some(PHONE), Some(BSUID)).await;
    let id = contacts(&db).await[0].0;
    // The older `user_changed_number`: the new phone, no new BSUID.
    change(&db, ids(Some(PHONE), None), ids(Some(NEW_PHONE), None)).await;
    // Its next message pairs the new phone with the new BSUID: the same customer, not a
    // new owner of the number (their old BSUID is no longer their pairing).
    assert_eq!(
        resolve(&db, Some(NEW_PHONE), Some(NEW_BSUID)).await,
        key(NEW_PHONE)
    );
    assert_eq!(
        contacts(&db).await,
        [(
            id,
            NEW_PHONE.to_string(),
            vec![BSUID.to_string(), NEW_BSUID.to_string()]
        )]
    );
    // And now that pairing is current: another BSUID with this number is a new owner.
    assert_eq!(
        resolve(&db, Some(NEW_PHONE), Some(STRANGER)).await,
        key(NEW_PHONE)
    );
    let all = contacts(&db).await;
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].1, NEW_BSUID, "ours, keyed by its current BSUID");
}

pub(super) async fn a_link_that_would_create_a_taken_identifier_writes_nothing(db: Db) {
    let by_bsuid = contact(&db, BSUID).await;
    let linked = db
        .link(Link {
            channel: CH.into(),
            contact: None,
            key: Some(PHONE.into()),
            alias: Some(BSUID.into()),
            ..Link::default()
        })
        .await
        .unwrap();
    assert!(
        matches!(&linked, Linked::Conflict { owner: Some(owner), .. } if owner == BSUID),
        "{linked:?}"
    );
    assert_eq!(contacts(&db).await, [(by_bsuid, BSUID.to_string(), vec![])]);
}

pub(super) async fn identity_changes_that_cannot_apply_change_nothing(db: Db) {
    let unknown = change(&db, ids(Some(PHONE), None), ids(Some(NEW_PHONE), None)).await;
    assert_eq!(unknown, IdentityChanged::UnknownContact);
    assert_eq!(
        change(&db, ids(Some(PHONE), None), ids(None, None)).await,
        IdentityChanged::NothingNew
    );
    let old = contact(&db, PHONE).await;
    let other = contact(&db, NEW_PHONE).await;
    let conflict = change(
        &db,
        ids(Some(PHONE), None),
        ids(Some(NEW_PHONE), Some(NEW_BSUID)),
    )
    .await;
    assert!(
        matches!(&conflict, IdentityChanged::Conflict(why) if why.contains(NEW_PHONE)),
        "{conflict:?}"
    );
    assert_eq!(
        contacts(&db).await,
        [
            (old, PHONE.to_string(), vec![]),
            (other, NEW_PHONE.to_string(), vec![])
        ],
        "all or nothing: not even the new BSUID was linked"
    );
}
