use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use time::OffsetDateTime;

use super::*;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn identity() -> Identity {
    Identity {
        service: "larder-webhook".into(),
        namespace: "larder".into(),
    }
}

/// Short lifetimes so a whole rotation cycle fits in a test.
fn lifetimes() -> Lifetimes {
    Lifetimes {
        ca_validity: DAY * 100,
        ca_renew_before: DAY * 20,
        leaf_validity: DAY * 10,
        leaf_renew_before: DAY * 3,
    }
}

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

fn changed(outcome: Outcome) -> (Material, Reason) {
    match outcome {
        Outcome::Changed { material, reason } => (material, reason),
        Outcome::Unchanged => panic!("expected new material"),
    }
}

fn bundle_ders(m: &Material) -> Vec<Vec<u8>> {
    pem::certificates(m.ca_bundle_pem.as_bytes(), "bundle")
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

/// Does a TLS client trusting the bundle accept the serving certificate for `name` at `at`?
fn verifies(m: &Material, name: &str, at: OffsetDateTime) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem::certificates(m.ca_bundle_pem.as_bytes(), "bundle").unwrap() {
        roots.add(ca).unwrap();
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), pem::provider())
        .build()
        .unwrap();
    let chain = pem::certificates(m.cert_pem.as_bytes(), "leaf").unwrap();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let at = UnixTime::since_unix_epoch(Duration::from_secs(at.unix_timestamp() as u64));
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &server_name, &[], at)
        .map(|_| ())
}

fn verifies_all_names(m: &Material, at: OffsetDateTime) {
    for name in identity().dns_names() {
        verifies(m, &name, at).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn dns_names_cover_every_service_form() {
    assert_eq!(
        identity().dns_names(),
        [
            "larder-webhook",
            "larder-webhook.larder",
            "larder-webhook.larder.svc",
            "larder-webhook.larder.svc.cluster.local"
        ]
    );
}

#[test]
fn first_run_makes_a_ca_and_a_serving_certificate_clients_accept() {
    let (m, reason) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    assert_eq!(reason, Reason::Missing);
    assert!(reason.changes_authority());
    assert_eq!(bundle_ders(&m).len(), 1);
    verifies_all_names(&m, t0());
    assert!(verifies(&m, "other.larder.svc", t0()).is_err());
    // Reused as long as it is fine.
    let later = t0() + DAY * 6;
    assert_eq!(
        ensure(Some(&m), &identity(), &lifetimes(), later).unwrap(),
        Outcome::Unchanged
    );
}

#[test]
fn a_whole_rotation_cycle() {
    let (id, l) = (identity(), lifetimes());
    let (m1, _) = changed(ensure(None, &id, &l, t0()).unwrap());

    // Day 8: the serving certificate has 2 days left: renewed by the same CA.
    let t = t0() + DAY * 8;
    let (m2, reason) = changed(ensure(Some(&m1), &id, &l, t).unwrap());
    assert_eq!(reason, Reason::LeafExpiring);
    assert!(!reason.changes_authority());
    assert_eq!(m2.ca_bundle_pem, m1.ca_bundle_pem);
    assert_eq!(m2.ca_key_pem, m1.ca_key_pem);
    assert_ne!(m2.cert_pem, m1.cert_pem);
    verifies_all_names(&m2, t);

    // Day 85: the CA has 15 days left: a new CA, the old one still trusted.
    let t = t0() + DAY * 85;
    let (m3, reason) = changed(ensure(Some(&m2), &id, &l, t).unwrap());
    assert_eq!(reason, Reason::CaExpiring);
    assert!(reason.changes_authority());
    let bundle = bundle_ders(&m3);
    assert_eq!(bundle.len(), 2);
    assert_eq!(
        bundle[1],
        bundle_ders(&m1)[0],
        "old CA kept, after the new one"
    );
    assert_ne!(m3.ca_key_pem, m1.ca_key_pem);
    verifies_all_names(&m3, t);

    // Day 94: serving certificate renewed again; the bundle keeps both CAs.
    let t = t0() + DAY * 94;
    let (m4, reason) = changed(ensure(Some(&m3), &id, &l, t).unwrap());
    assert_eq!(reason, Reason::LeafExpiring);
    assert_eq!(m4.ca_bundle_pem, m3.ca_bundle_pem);

    // Day 100.5: the old CA has expired: dropped, nothing else changes.
    let t = t0() + DAY * 201 / 2;
    let (m5, reason) = changed(ensure(Some(&m4), &id, &l, t).unwrap());
    assert_eq!(reason, Reason::PrunedExpiredAuthorities);
    assert_eq!(bundle_ders(&m5), bundle_ders(&m3)[..1]);
    assert_eq!(m5.cert_pem, m4.cert_pem);
    verifies_all_names(&m5, t);
    assert_eq!(ensure(Some(&m5), &id, &l, t).unwrap(), Outcome::Unchanged);
}

#[test]
fn serving_certificate_never_outlives_its_ca() {
    let l = Lifetimes {
        ca_validity: DAY * 12,
        ca_renew_before: DAY,
        leaf_validity: DAY * 10,
        leaf_renew_before: DAY,
    };
    let (m1, _) = changed(ensure(None, &identity(), &l, t0()).unwrap());
    // Day 7: the leaf has 3 days left, fine; day 9.5: renewed, but only until the CA ends.
    let t = t0() + DAY * 19 / 2;
    let (m2, reason) = changed(ensure(Some(&m1), &identity(), &l, t).unwrap());
    assert_eq!(reason, Reason::LeafExpiring);
    let chain = pem::certificates(m2.cert_pem.as_bytes(), "leaf").unwrap();
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let ca_end = (t0() + DAY * 12).unix_timestamp();
    assert!(leaf.validity().not_after.timestamp() <= ca_end);
}

#[test]
fn expired_serving_certificate_is_replaced() {
    let (m1, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    let t = t0() + DAY * 11;
    let (_, reason) = changed(ensure(Some(&m1), &identity(), &lifetimes(), t).unwrap());
    assert_eq!(reason, Reason::LeafUnusable("expired".into()));
}

#[test]
fn renamed_service_gets_a_new_serving_certificate() {
    let (m1, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    let renamed = Identity {
        service: "cache-webhook".into(),
        namespace: "larder".into(),
    };
    let (m2, reason) = changed(ensure(Some(&m1), &renamed, &lifetimes(), t0()).unwrap());
    assert!(
        matches!(&reason, Reason::LeafUnusable(why) if why.contains("cache-webhook")),
        "{reason}"
    );
    assert_eq!(m2.ca_bundle_pem, m1.ca_bundle_pem);
    verifies(&m2, "cache-webhook.larder.svc", t0()).unwrap();
}

#[test]
fn serving_certificate_from_another_ca_is_replaced() {
    let (m1, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    let (other, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    let mixed = Material {
        cert_pem: other.cert_pem.clone(),
        key_pem: other.key_pem.clone(),
        ..m1.clone()
    };
    let (m2, reason) = changed(ensure(Some(&mixed), &identity(), &lifetimes(), t0()).unwrap());
    assert_eq!(
        reason,
        Reason::LeafUnusable("not issued by the current CA".into())
    );
    verifies_all_names(&m2, t0());
}

#[test]
fn mismatched_keys_are_detected() {
    let (m1, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    let (other, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());

    let wrong_leaf_key = Material {
        key_pem: other.key_pem.clone(),
        ..m1.clone()
    };
    let (_, reason) =
        changed(ensure(Some(&wrong_leaf_key), &identity(), &lifetimes(), t0()).unwrap());
    assert!(
        matches!(reason, Reason::LeafUnusable(ref w) if w.contains("key")),
        "{reason}"
    );

    let wrong_ca_key = Material {
        ca_key_pem: other.ca_key_pem.clone(),
        ..m1.clone()
    };
    let (m2, reason) =
        changed(ensure(Some(&wrong_ca_key), &identity(), &lifetimes(), t0()).unwrap());
    assert!(
        matches!(reason, Reason::CaUnusable(ref w) if w.contains("key")),
        "{reason}"
    );
    // The old CA is still valid, so it stays trusted behind the new one.
    assert_eq!(bundle_ders(&m2)[1], bundle_ders(&m1)[0]);
    verifies_all_names(&m2, t0());
}

#[test]
fn garbage_is_replaced_from_scratch() {
    let garbage = Material {
        ca_bundle_pem: "not pem".into(),
        ca_key_pem: String::new(),
        cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n".into(),
        key_pem: String::new(),
    };
    let (m, reason) = changed(ensure(Some(&garbage), &identity(), &lifetimes(), t0()).unwrap());
    assert!(matches!(reason, Reason::CaUnusable(_)), "{reason}");
    assert_eq!(bundle_ders(&m).len(), 1);
    verifies_all_names(&m, t0());
}

#[test]
fn a_leaf_in_the_ca_slot_is_not_a_ca() {
    let (m1, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    let swapped = Material {
        ca_bundle_pem: m1.cert_pem.clone(),
        ca_key_pem: m1.key_pem.clone(),
        ..m1.clone()
    };
    let (_, reason) = changed(ensure(Some(&swapped), &identity(), &lifetimes(), t0()).unwrap());
    assert!(
        matches!(reason, Reason::CaUnusable(ref w) if w.contains("not a CA")),
        "{reason}"
    );
}

#[test]
fn debug_output_never_shows_keys() {
    let (m, _) = changed(ensure(None, &identity(), &lifetimes(), t0()).unwrap());
    let shown = format!("{m:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(shown.contains("CERTIFICATE"));
}
