//! The fuzz targets' bodies: one function per target, each taking libFuzzer's bytes, calling
//! larder's public parsers and asserting properties of what they return (not only "no panic").
//!
//! The same file is compiled into the main workspace's tests
//! (`tests/tests/fuzz_corpus.rs`, via `#[path]`), which replays the committed corpus through
//! these functions on every `cargo test`, so it must build with the main workspace's lints and
//! use only crates both have: larder-core, larder-proxy, larder-webhook, serde_json, json-patch
//! and base64.
//!
//! A property failure is a panic: that is how libFuzzer (and the replay test) learn of it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine as _;
use larder_core::auth;
use larder_core::digest::Digest;
use larder_core::dockerconfig::{self, Credentials, DockerConfig};
use larder_core::reference::{self, Reference};
use larder_proxy::range::{self, RangeDecision};
use larder_proxy::route::{self, ManifestRef, Route};
use larder_webhook::exclude::Exclusions;
use larder_webhook::mutate::{Action, MutationConfig};
use larder_webhook::pull_secrets::{self, PullSecretsMode, SourceFormat, SourceSecret};
use larder_webhook::review::{self, Reviewed, Step};
use serde_json::Value;

/// The proxy address the webhook targets use (the default one).
const PROXY: &str = larder_core::DEFAULT_PROXY_ADDRESS;

/// The input as text, split at the first newline into a main part and an optional second one.
fn text_and_extra(data: &[u8]) -> Option<(&str, Option<&str>)> {
    let text = std::str::from_utf8(data).ok()?;
    Some(match text.split_once('\n') {
        Some((a, b)) => (a, Some(b)),
        None => (text, None),
    })
}

// ---------------------------------------------------------------------------------------------
// route

/// `route`: `<path>[\n<ns>]` through [`route::parse`] (the second line is the `ns` query
/// parameter of containerd's mirror form).
///
/// Checks: errors map to 400/404/405; `Base` only for `/v2` and `/v2/`; a parsed image's
/// registry and repository are canonical (they parse to themselves); the canonical rewritten
/// path (`/v2/<host>[_<port>]/<repo>/<kind>/<ref>`) and the mirror form with `ns=<registry>`
/// route to the very same thing.
pub fn route(data: &[u8]) {
    let Some((path, ns)) = text_and_extra(data) else {
        return;
    };
    let parsed = route::parse(path, ns);
    let route = match parsed {
        Err(e) => {
            let status = e.status().as_u16();
            assert!(matches!(status, 400 | 404 | 405), "{e}: status {status}");
            assert!(!e.oci_code().is_empty());
            return;
        }
        Ok(Route::Base) => {
            assert!(matches!(path, "/v2" | "/v2/"), "Base for {path:?}");
            return;
        }
        Ok(r) => r,
    };
    let (image, kind, reference) = match &route {
        Route::Manifest { image, reference } => (
            image,
            "manifests",
            match reference {
                ManifestRef::Tag(t) => t.clone(),
                ManifestRef::Digest(d) => d.to_string(),
            },
        ),
        Route::Blob { image, digest } => (image, "blobs", digest.to_string()),
        Route::Referrers { image, digest } => (image, "referrers", digest.to_string()),
        Route::Tags { image, .. } => {
            // The path form is part of the route (links go back in the same form): compare
            // the image both forms name.
            route_image_is_canonical(image, path);
            let canonical = format!("/v2/{}/tags/list", image.proxy_repository());
            let again = route::parse(&canonical, None);
            assert!(
                matches!(&again, Ok(Route::Tags { image: i, .. }) if i == image),
                "{path:?} and its canonical path {canonical:?} differ: {again:?}"
            );
            return;
        }
        Route::Base => return,
    };
    route_image_is_canonical(image, path);

    let canonical = format!("/v2/{}/{kind}/{reference}", image.proxy_repository());
    assert_eq!(
        route::parse(&canonical, None).as_ref(),
        Ok(&route),
        "{path:?} (ns {ns:?}) and its canonical path {canonical:?} differ"
    );
    if !image.registry.starts_with('[') {
        let mirror = format!("/v2/{}/{kind}/{reference}", image.repository);
        assert_eq!(
            route::parse(&mirror, Some(&image.registry)).as_ref(),
            Ok(&route),
            "{path:?} (ns {ns:?}) and its mirror form {mirror:?} ns={} differ",
            image.registry
        );
    }
}

/// A routed image's registry and repository are canonical: they parse to themselves.
fn route_image_is_canonical(image: &route::Image, path: &str) {
    let again = Reference::parse_on_registry(&image.registry, &image.repository)
        .unwrap_or_else(|e| panic!("{image:?} from {path:?} does not parse again: {e}"));
    assert_eq!(again.registry(), image.registry, "registry not canonical");
    assert_eq!(
        again.repository(),
        image.repository,
        "repository not canonical"
    );
}

// ---------------------------------------------------------------------------------------------
// reference

/// `reference`: `<image>[\n<proxy address>]` through [`Reference::parse`],
/// [`Reference::rewrite`], [`Reference::from_rewritten`] and [`reference::is_on_proxy`]
/// (the proxy address defaults to `localhost:7439`).
///
/// Checks, for every reference that parses: parse → display → parse gives the same reference
/// and display is a fixed point; the invariants of the canonical form (lowercase registry, a tag
/// unless a digest pins it, name at most 255 characters); the `CachedImage` name is a valid
/// Kubernetes name; and the rewrite is reversible (`from_rewritten(rewrite(r)) == r`),
/// idempotent (its output is on the proxy, which the webhook leaves alone, and rewriting what
/// `from_rewritten` gives back yields the same string) and itself a valid reference on the
/// proxy registry.
pub fn reference(data: &[u8]) {
    let Some((image, proxy)) = text_and_extra(data) else {
        return;
    };
    let proxy = proxy.unwrap_or(PROXY);
    let _ = reference::is_on_proxy(image, proxy);

    // Whatever is read back from the proxy form is a canonical reference too, except that a
    // registry with no `.` or `:` other than `localhost` (`<proxy>/registry/app`, which no
    // rewrite produces) has no docker-syntax spelling: `registry/app` is Docker Hub's.
    if let Ok(Some(original)) = Reference::from_rewritten(image, proxy) {
        let registry = original.registry();
        if registry.contains(['.', ':']) || registry == "localhost" {
            check_canonical(&original);
        }
        if let Ok(again) = original.rewrite(proxy) {
            assert_eq!(
                Reference::from_rewritten(&again, proxy),
                Ok(Some(original.clone())),
                "from_rewritten({again:?}) is not the reference it was rewritten from"
            );
        }
    }

    let Ok(parsed) = Reference::parse(image) else {
        return;
    };
    check_canonical(&parsed);
    let Ok(rewritten) = parsed.rewrite(proxy) else {
        return;
    };
    assert!(
        reference::is_on_proxy(&rewritten, proxy),
        "{rewritten:?} is not on {proxy:?}"
    );
    assert_eq!(
        Reference::from_rewritten(&rewritten, proxy),
        Ok(Some(parsed.clone())),
        "the rewrite of {image:?} ({rewritten:?}) does not reverse"
    );
    assert_eq!(
        parsed.rewrite(proxy).as_ref(),
        Ok(&rewritten),
        "rewrite is not deterministic"
    );
    // With a proxy address that is itself a canonical registry (as the webhook's is), the
    // rewritten image is a valid reference on it, with the same tag and digest.
    let proxy_is_registry = Reference::parse(&format!("{proxy}/x"))
        .is_ok_and(|p| p.registry() == proxy && p.repository() == "x" && !proxy.starts_with('['));
    if proxy_is_registry {
        let on_proxy = Reference::parse(&rewritten)
            .unwrap_or_else(|e| panic!("rewritten {rewritten:?} is not a reference: {e}"));
        assert_eq!(on_proxy.registry(), proxy);
        assert_eq!(on_proxy.repository(), parsed.proxy_repository().unwrap());
        assert_eq!(on_proxy.tag(), parsed.tag());
        assert_eq!(on_proxy.digest(), parsed.digest());
    }
}

/// Invariants of a parsed reference.
fn check_canonical(r: &Reference) {
    let shown = r.to_string();
    let again = Reference::parse(&shown)
        .unwrap_or_else(|e| panic!("display {shown:?} of {r:?} does not parse: {e}"));
    assert_eq!(&again, r, "parse(display(r)) != r for {shown:?}");
    assert_eq!(again.to_string(), shown, "display is not a fixed point");

    assert_eq!(r.registry(), r.registry().to_ascii_lowercase());
    assert!(r.tag().is_some() || r.digest().is_some(), "{r:?}");
    assert!(r.name().len() <= reference::NAME_MAX_LEN, "{shown:?}");
    if let Some(tag) = r.tag() {
        assert!(!tag.is_empty() && tag.len() <= reference::TAG_MAX_LEN);
    }
    if let Some(digest) = r.digest() {
        assert_eq!(Digest::parse(&digest.to_string()).as_ref(), Ok(digest));
        assert_eq!(r.manifest_reference(), digest.to_string());
    }
    let _ = r.is_loopback_registry();

    let name = r.cached_image_name();
    assert!(
        is_dns1123_subdomain(&name) && name.len() <= 63,
        "CachedImage name {name:?} for {shown:?}"
    );
}

/// `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`, every `.`-separated label starting and ending alphanumeric.
fn is_dns1123_subdomain(name: &str) -> bool {
    let b = name.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-' || *c == b'.')
        && !name.contains("..")
        && !name.contains(".-")
        && !name.contains("-.")
}

// ---------------------------------------------------------------------------------------------
// admission

/// `admission`: the bytes as an AdmissionReview body through [`review::review`] (`--pull-secrets
/// skip`) and [`review::start`] / [`review::PendingReview::finish`] (`derive`, with a derived
/// Secret), with an `--exclude-image` pattern.
///
/// Checks: the answer is always a JSON `admission.k8s.io/v1` AdmissionReview with
/// `allowed: true` (never blocking a pod) and the request's uid; its `patch` is base64 of a valid
/// JSON patch (`patchType: JSONPatch`) that applies to the object, with one `image` replace per
/// rewritten image, each on the proxy and reversing to the image as written; and the mutation is
/// idempotent: the patched pod sent again gets no patch.
pub fn admission(data: &[u8]) {
    let skip = config(PullSecretsMode::Skip);
    let reviewed = review::review(data, &skip);
    check_review(data, &reviewed, &skip);

    let derive = config(PullSecretsMode::Derive);
    let reviewed = match review::start(data, &derive) {
        Step::Answered(reviewed) => *reviewed,
        Step::NeedsPullSecrets(pending) => {
            let _ = (
                pending.namespace(),
                pending.secret_names(),
                pending.dry_run(),
            );
            pending.finish(&derive, Ok(Some("larder-pull-0123456789".to_owned())))
        }
    };
    check_review(data, &reviewed, &derive);
}

fn config(pull_secrets: PullSecretsMode) -> MutationConfig {
    MutationConfig {
        proxy_address: PROXY.to_owned(),
        // A fixed, valid pattern.
        exclude: Exclusions::new([r"^quay\.io/excluded/"]).expect("valid pattern"),
        pull_secrets,
    }
}

fn check_review(body: &[u8], reviewed: &Reviewed, config: &MutationConfig) {
    assert!(
        matches!(reviewed.status.as_u16(), 200 | 400 | 413),
        "status {}",
        reviewed.status
    );
    let answer: Value = serde_json::from_slice(&reviewed.body).expect("the answer is JSON");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["allowed"], true, "a pod was blocked: {answer}");

    // `None` for bodies `Value` refuses although the webhook's types read them (invalid UTF-8
    // in a string of a field the types ignore: serde skips it unchecked).
    let input: Option<Value> = serde_json::from_slice(body).ok();
    if reviewed.status.as_u16() == 200
        && let Some(input) = &input
    {
        assert_eq!(response["uid"], input["request"]["uid"], "uid not echoed");
    }

    let Some(patch) = response.get("patch") else {
        assert!(
            reviewed.mutation.patch.is_empty(),
            "patch computed, not sent"
        );
        return;
    };
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch.as_str().expect("the patch is a base64 string"))
        .expect("the patch is base64");
    let sent: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON patch");
    assert_eq!(sent.0, reviewed.mutation.patch, "sent patch differs");

    let replaces = sent
        .0
        .iter()
        .filter(|op| {
            matches!(op, json_patch::PatchOperation::Replace(r) if r.path.to_string().ends_with("/image"))
        })
        .count();
    assert_eq!(
        replaces,
        reviewed.mutation.rewritten(),
        "one replace per image"
    );
    for decision in &reviewed.mutation.images {
        if let Action::Rewritten(new) = &decision.action {
            let old = decision
                .image
                .as_deref()
                .expect("a rewritten image was written");
            assert!(reference::is_on_proxy(new, &config.proxy_address));
            assert_eq!(
                Reference::from_rewritten(new, &config.proxy_address),
                Ok(Some(
                    Reference::parse(old).expect("a rewritten image parses")
                )),
                "{old:?} → {new:?} does not reverse"
            );
        }
    }

    // Idempotence: the patched object, sent again, gets no patch. (The webhook checks its
    // patch against the object as it decoded it; an input whose raw JSON differs from that in
    // a way the patch notices is left out here.)
    let Some(mut input) = input else {
        return;
    };
    let object = &mut input["request"]["object"];
    if json_patch::patch(object, &sent.0).is_err() {
        return;
    }
    let again_body = serde_json::to_vec(&input).expect("JSON serializes");
    let again = match review::start(&again_body, config) {
        Step::Answered(reviewed) => *reviewed,
        Step::NeedsPullSecrets(_) => panic!("the patched pod still needs its pull secrets"),
    };
    assert_eq!(again.status.as_u16(), 200);
    assert!(
        again.mutation.patch.is_empty(),
        "not idempotent: second patch {:?} after {:?}",
        again.mutation.patch,
        sent.0
    );
}

// ---------------------------------------------------------------------------------------------
// docker config / pull secrets

/// `docker_config`: the bytes as `.dockerconfigjson` and `.dockercfg` through
/// [`DockerConfig::parse`] / [`DockerConfig::parse_legacy`] and the webhook's
/// [`pull_secrets::derive_pull_secret`]; as text through
/// [`Credentials::from_basic_header`] and [`dockerconfig::registry_key`].
///
/// Checks: every parsed entry's host is canonical and is its key's registry; its credentials
/// are found for its own host (and path); `Basic` headers round-trip; a derived Secret has a
/// `larder-pull-<10 hex>` name, its config holds exactly its sorted keys, each on the proxy
/// with a registry component that decodes and that the rewritten images of that registry start
/// with, and deriving again from the derived Secret gives nothing (its keys are on the proxy).
pub fn docker_config(data: &[u8]) {
    for parsed in [DockerConfig::parse(data), DockerConfig::parse_legacy(data)] {
        let Ok(config) = parsed else { continue };
        for entry in &config.entries {
            assert_eq!(dockerconfig::canonical_host(&entry.host), entry.host);
            assert_eq!(dockerconfig::registry_key(&entry.key), entry.host);
            assert!(
                !entry.host.is_empty(),
                "entry with no host: {:?}",
                entry.key
            );
            let repository = if entry.path.is_empty() {
                "some/repo"
            } else {
                &entry.path
            };
            assert!(
                config
                    .matching(&entry.host, repository)
                    .contains(&&entry.credentials),
                "entry {:?} not found for its own host and path",
                entry.key
            );
            assert!(config.for_registry(&entry.host).is_some());
            check_basic(&entry.credentials);
        }
    }
    for format in [SourceFormat::Json, SourceFormat::Legacy] {
        check_derived(data, format);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(c) = Credentials::from_basic_header(text) {
            assert!(!c.username.is_empty());
            check_basic(&c);
        }
        let key = dockerconfig::registry_key(text);
        assert_eq!(dockerconfig::canonical_host(&key), key);
    }
}

fn check_basic(c: &Credentials) {
    if c.username.is_empty() || c.username.contains(':') {
        return;
    }
    let back = Credentials::from_basic_header(&c.basic_header());
    assert_eq!(
        back,
        Some(Credentials::new(c.username.clone(), c.password.clone())),
        "Basic header does not round-trip"
    );
}

fn check_derived(data: &[u8], format: SourceFormat) {
    let source = SourceSecret {
        name: "pull".into(),
        version: "uid/1".into(),
        format,
        data: data.to_vec(),
    };
    let Ok(derived) = pull_secrets::derive_pull_secret(PROXY, std::slice::from_ref(&source)) else {
        return;
    };
    let hash = derived
        .name
        .strip_prefix(pull_secrets::DERIVED_PREFIX)
        .expect("derived prefix");
    assert!(hash.len() == 10 && hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(derived.keys.windows(2).all(|w| w[0] < w[1]), "keys sorted");

    let config: Value = serde_json::from_slice(&derived.config).expect("derived config is JSON");
    let auths = config["auths"].as_object().expect("auths");
    let keys: Vec<&String> = auths.keys().collect();
    assert_eq!(keys.len(), derived.keys.len());
    for key in &derived.keys {
        assert!(
            auths.contains_key(key),
            "key {key:?} missing from the config"
        );
        let rest = key
            .strip_prefix(PROXY)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or_else(|| panic!("derived key {key:?} is not on the proxy"));
        let (component, path) = rest
            .split_once('/')
            .unwrap_or_else(|| panic!("derived key {key:?} does not end its registry"));
        let registry = reference::decode_registry(component)
            .unwrap_or_else(|e| panic!("derived key {key:?}: {e}"));
        assert_eq!(
            reference::encode_registry(&registry).as_deref(),
            Ok(component)
        );
        if path.is_empty()
            && let Ok(image) = Reference::parse_on_registry(&registry, "some/repo:tag")
            && let Ok(rewritten) = image.rewrite(PROXY)
        {
            assert!(
                rewritten.starts_with(key.as_str()),
                "{rewritten:?} does not match derived key {key:?}"
            );
        }
    }

    let again = pull_secrets::derive_pull_secret(
        PROXY,
        &[SourceSecret {
            data: derived.config.clone(),
            format: SourceFormat::Json,
            ..source
        }],
    )
    .expect("the derived config is a valid source");
    assert!(
        again.is_empty(),
        "derived keys were derived again: {:?}",
        again.keys
    );
}

// ---------------------------------------------------------------------------------------------
// WWW-Authenticate

/// `www_authenticate`: the text through [`auth::parse_challenge`], the bytes through
/// [`auth::parse_token_response`].
///
/// Checks: a challenge is found exactly when the header is not blank; its scheme and parameter
/// names are lowercase and not empty; printing the challenge back (quoted values, `\` escapes)
/// and parsing it again gives the same challenge. A token answer that is accepted has a token
/// and a lifetime.
pub fn www_authenticate(data: &[u8]) {
    if let Ok((token, lifetime)) = auth::parse_token_response(data) {
        assert!(!token.is_empty() && !lifetime.is_zero());
    }
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = auth::parse_challenge(header);
    assert_eq!(parsed.is_none(), header.trim().is_empty(), "{header:?}");
    let Some(challenge) = parsed else { return };
    assert!(!challenge.scheme.is_empty());
    assert_eq!(challenge.scheme, challenge.scheme.to_ascii_lowercase());
    assert!(!challenge.scheme.contains(char::is_whitespace));
    for key in challenge.params.keys() {
        assert!(!key.is_empty());
        assert_eq!(key, &key.to_ascii_lowercase());
    }
    let mut printed = challenge.scheme.clone();
    let mut keys: Vec<&String> = challenge.params.keys().collect();
    keys.sort();
    for (i, key) in keys.into_iter().enumerate() {
        let value = &challenge.params[key];
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
        printed.push_str(if i == 0 { " " } else { ", " });
        printed.push_str(&format!("{key}=\"{escaped}\""));
    }
    assert_eq!(
        auth::parse_challenge(&printed).as_ref(),
        Some(&challenge),
        "{header:?} printed as {printed:?} does not parse back"
    );
}

// ---------------------------------------------------------------------------------------------
// Range

/// `range`: byte 0 picks the blob size (odd: the next 8 bytes, little-endian; even: byte 1, a
/// small blob), the rest is the `Range` header, through [`range::decide`].
///
/// Checks: a partial answer lies within the blob and is not empty, its `Content-Range` says
/// exactly that range; 416 only for `bytes=` ranges; and, for the plain single-range forms
/// (`bytes=A-B`, `bytes=A-`, `bytes=-N`), the decision is the one RFC 9110 §14 gives,
/// computed independently here.
pub fn range(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (total, header) = if mode & 1 == 1 {
        let Some((size, header)) = rest.split_first_chunk::<8>() else {
            return;
        };
        (u64::from_le_bytes(*size), header)
    } else {
        let Some((&size, header)) = rest.split_first() else {
            return;
        };
        (u64::from(size), header)
    };
    let Ok(header) = std::str::from_utf8(header) else {
        return;
    };
    assert_eq!(range::decide(None, total), RangeDecision::Full);
    let decision = range::decide(Some(header), total);
    match decision {
        RangeDecision::Partial(r) => {
            assert!(
                r.start < r.end && r.end <= total,
                "{r:?} outside a {total}-byte blob for {header:?}"
            );
            assert_eq!(r.len(), r.end - r.start);
            assert!(!r.is_empty());
            assert_eq!(
                r.content_range(total),
                format!("bytes {}-{}/{}", r.start, r.end - 1, total)
            );
        }
        RangeDecision::NotSatisfiable => assert!(header.contains("bytes="), "{header:?}"),
        RangeDecision::Full => {}
    }
    if let Some(expected) = rfc_decision(header, total) {
        assert_eq!(decision, expected, "{header:?} on a {total}-byte blob");
    }
}

/// The RFC 9110 answer for `bytes=A-B`, `bytes=A-` and `bytes=-N` written plainly (no spaces,
/// numbers that fit in a u64); `None` for anything else.
fn rfc_decision(header: &str, total: u64) -> Option<RangeDecision> {
    let spec = header.strip_prefix("bytes=")?;
    let (first, last) = spec.split_once('-')?;
    let number = |s: &str| -> Option<Option<u64>> {
        if s.is_empty() {
            return Some(None);
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().map(Some)
    };
    let part = |start, end| RangeDecision::Partial(range::ByteRange { start, end });
    Some(match (number(first)?, number(last)?) {
        (None, None) => return None,
        (None, Some(n)) if n == 0 || total == 0 => RangeDecision::NotSatisfiable,
        (None, Some(n)) => part(total - n.min(total), total),
        (Some(a), _) if a >= total => RangeDecision::NotSatisfiable,
        (Some(a), None) => part(a, total),
        (Some(a), Some(b)) if b < a => RangeDecision::Full,
        (Some(a), Some(b)) => part(a, b.min(total - 1) + 1),
    })
}
