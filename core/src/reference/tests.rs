use super::*;
use proptest::prelude::*;

const PROXY: &str = "localhost:7439";
const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn canon(input: &str) -> String {
    Reference::parse(input)
        .unwrap_or_else(|e| panic!("{input:?} should parse: {e}"))
        .to_string()
}

#[test]
fn normalises_the_tricky_cases() {
    let cases: &[(&str, &str)] = &[
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.27", "docker.io/library/nginx:1.27"),
        ("library/nginx", "docker.io/library/nginx:latest"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("docker.io/nginx", "docker.io/library/nginx:latest"),
        (
            "index.docker.io/library/nginx",
            "docker.io/library/nginx:latest",
        ),
        ("registry-1.docker.io/nginx:1", "docker.io/library/nginx:1"),
        ("Docker.IO/nginx", "docker.io/library/nginx:latest"),
        ("ghcr.io/org/team/app:v1.2.3", "ghcr.io/org/team/app:v1.2.3"),
        ("GHCR.io/org/app", "ghcr.io/org/app:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app:dev", "localhost:5000/app:dev"),
        ("registry:5000/team/app", "registry:5000/team/app:latest"),
        ("10.0.0.1:5000/app:1", "10.0.0.1:5000/app:1"),
        ("10.0.0.1/app", "10.0.0.1/app:latest"),
        ("[::1]:5000/app", "[::1]:5000/app:latest"),
        ("[2001:DB8::1]/app", "[2001:db8::1]/app:latest"),
        ("host:05000/app", "host:5000/app:latest"),
        (
            &format!("nginx@{D}"),
            &format!("docker.io/library/nginx@{D}"),
        ),
        (
            &format!("nginx:1.27@{D}"),
            &format!("docker.io/library/nginx:1.27@{D}"),
        ),
        (
            &format!("quay.io:443/a/b:c@{D}"),
            &format!("quay.io:443/a/b:c@{D}"),
        ),
        ("a/b/c/d/e/f:tag_1.0-rc", "docker.io/a/b/c/d/e/f:tag_1.0-rc"),
        (
            "my-reg.example.com/a__b/c.d/e-f/g---h:T",
            "my-reg.example.com/a__b/c.d/e-f/g---h:T",
        ),
        ("x:_tag", "docker.io/library/x:_tag"),
    ];
    for (input, want) in cases {
        assert_eq!(&canon(input), want, "input {input:?}");
        // The canonical form is a fixed point.
        assert_eq!(&canon(want), want);
    }
}

#[test]
fn rejects_what_the_grammar_rejects_and_says_why() {
    let long_tag = "t".repeat(129);
    let long_name = format!("example.com/{}", "a".repeat(250));
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "empty"),
        ("nginx:".into(), "invalid tag"),
        (":tag".into(), "repository name is missing"),
        ("Nginx".into(), "uppercase"),
        ("example.com/Org/app".into(), "uppercase"),
        ("UPPER/app".into(), "ambiguous"),
        ("nginx:-bad".into(), "invalid tag"),
        ("nginx:.bad".into(), "invalid tag"),
        (format!("nginx:{long_tag}"), "invalid tag"),
        ("nginx@sha256:abc".into(), "invalid digest"),
        (format!("nginx@{D}@{D}"), "more than one `@`"),
        (
            "nginx@md5:d41d8cd98f00b204e9800998ecf8427e".into(),
            "not supported",
        ),
        ("a//b".into(), "invalid path component ``"),
        ("a/b/".into(), "invalid path component"),
        ("-a/b".into(), "invalid path component `-a`"),
        ("a_/b".into(), "invalid path component `a_`"),
        ("a___b".into(), "invalid path component"),
        ("a..b".into(), "invalid path component"),
        ("example.com/".into(), "repository name is missing"),
        ("ex_ample.com/app".into(), "invalid registry host"),
        ("-bad.com/app".into(), "does not start or end with a dash"),
        ("bad..com/app".into(), "empty labels"),
        ("host:0/app".into(), "invalid port `0`"),
        ("host:99999/app".into(), "invalid port"),
        ("host:/app".into(), "invalid port ``"),
        ("host:12a/app".into(), "invalid port"),
        ("[::1/app".into(), "closing `]`"),
        ("[zz::1]/app".into(), "not a valid IPv6"),
        ("nginx latest".into(), "whitespace"),
        ("nginx\n".into(), "whitespace"),
        (long_name, "limit is 255"),
        ("héllo".into(), "invalid path component"),
    ];
    for (input, want) in cases {
        let err = Reference::parse(&input)
            .expect_err(&format!("{input:?} should be rejected"))
            .to_string();
        assert!(
            err.contains(want),
            "{input:?}: got {err:?}, wanted {want:?}"
        );
    }
}

#[test]
fn names_up_to_255_characters_are_accepted() {
    // "example.com/" is 12 characters; 243 more make exactly 255.
    let name = format!("example.com/{}", "a".repeat(243));
    let r = Reference::parse(&name).unwrap();
    assert_eq!(r.name().len(), 255);
    // Its rewrite would be longer than 255: refused, not truncated.
    let err = r.rewrite(PROXY).unwrap_err().to_string();
    assert!(err.contains("255"), "{err}");
}

#[test]
fn rewrites_onto_the_proxy_and_back() {
    let cases: &[(&str, &str)] = &[
        ("nginx:1.27", "localhost:7439/docker.io/library/nginx:1.27"),
        ("nginx", "localhost:7439/docker.io/library/nginx:latest"),
        (
            "registry:5000/team/app",
            "localhost:7439/registry_5000/team/app:latest",
        ),
        (
            "10.1.2.3:8080/app:v1",
            "localhost:7439/10.1.2.3_8080/app:v1",
        ),
        ("Quay.IO/org/app", "localhost:7439/quay.io/org/app:latest"),
        (
            &format!("ghcr.io/a/b@{D}"),
            &format!("localhost:7439/ghcr.io/a/b@{D}"),
        ),
        (
            &format!("ghcr.io/a/b:v1@{D}"),
            &format!("localhost:7439/ghcr.io/a/b:v1@{D}"),
        ),
    ];
    for (input, want) in cases {
        let r = Reference::parse(input).unwrap();
        let rewritten = r.rewrite(PROXY).unwrap();
        assert_eq!(&rewritten, want);
        // The rewritten form is itself a valid reference (containerd must accept it).
        let as_ref = Reference::parse(&rewritten).unwrap();
        assert_eq!(as_ref.registry(), PROXY);
        assert!(is_on_proxy(&rewritten, PROXY));
        let back = Reference::from_rewritten(&rewritten, PROXY)
            .unwrap()
            .unwrap();
        assert_eq!(back, r, "{input}");
    }
}

#[test]
fn from_rewritten_leaves_other_images_alone_and_rejects_garbage() {
    assert_eq!(Reference::from_rewritten("nginx", PROXY).unwrap(), None);
    assert_eq!(
        Reference::from_rewritten("localhost:74390/x/y", PROXY).unwrap(),
        None
    );
    assert!(is_on_proxy("LOCALHOST:7439/docker.io/library/x", PROXY));
    assert!(!is_on_proxy("localhost:7439", PROXY));
    let err = Reference::from_rewritten("localhost:7439/docker.io", PROXY).unwrap_err();
    assert!(matches!(err, ReferenceError::MissingRepository(_)), "{err}");
    let err = Reference::from_rewritten("localhost:7439/host_port/app", PROXY).unwrap_err();
    assert!(err.to_string().contains("invalid port `port`"), "{err}");
    let err = Reference::from_rewritten("localhost:7439/ex!ample.com/app", PROXY).unwrap_err();
    assert!(
        err.to_string().contains("localhost:7439/ex!ample.com/app"),
        "{err}"
    );
}

#[test]
fn ipv6_registries_parse_but_are_not_rewritten() {
    let r = Reference::parse("[fd00::1]:5000/app").unwrap();
    assert_eq!(r.registry(), "[fd00::1]:5000");
    let err = r.rewrite(PROXY).unwrap_err().to_string();
    assert!(err.contains("IPv6"), "{err}");
}

#[test]
fn loopback_registries_are_recognised() {
    for loopback in [
        "localhost/a",
        "localhost:5000/a",
        "127.0.0.1:5000/a",
        "127.8.9.10/a",
        "[::1]:5000/a",
        "app.localhost/a",
    ] {
        assert!(
            Reference::parse(loopback).unwrap().is_loopback_registry(),
            "{loopback}"
        );
    }
    for remote in [
        "nginx",
        "10.0.0.1/a",
        "ghcr.io/a",
        "[fd00::1]/a",
        "localhost.example.com/a",
    ] {
        assert!(
            !Reference::parse(remote).unwrap().is_loopback_registry(),
            "{remote}"
        );
    }
}

#[test]
fn manifest_reference_prefers_the_digest() {
    let r = Reference::parse(&format!("a/b:v1@{D}")).unwrap();
    assert_eq!(r.manifest_reference(), D);
    assert_eq!(
        Reference::parse("a/b").unwrap().manifest_reference(),
        "latest"
    );
}

#[test]
fn cached_image_names_are_dns_safe_readable_and_distinct() {
    let a = Reference::parse("nginx:1.27").unwrap().cached_image_name();
    assert!(a.starts_with("docker.io-library-nginx-1.27-"), "{a}");
    let b = Reference::parse("nginx:1-27").unwrap().cached_image_name();
    assert_ne!(a, b, "same readable prefix, different images");
    let long = Reference::parse(&format!(
        "example.com/{}:{}",
        "a".repeat(200),
        "t".repeat(100)
    ))
    .unwrap()
    .cached_image_name();
    assert!(long.len() <= 63, "{long}");
    let pinned = Reference::parse(&format!("ghcr.io/x/y@{D}"))
        .unwrap()
        .cached_image_name();
    assert!(is_dns1123_label(&pinned), "{pinned}");
}

fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_dns1123_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') || is_dns1123_subdomain(name) && name.len() <= 63
}

// ---- property tests -------------------------------------------------------------------------

fn path_component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,2}"
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9]{0,8}(-[a-z0-9]{1,5})?(\\.[a-z]{2,6}){1,2}",
        "[A-Z][A-Za-z0-9]{0,6}\\.[A-Za-z]{2,4}",
        Just("localhost".to_owned()),
        (1u8..=254, 0u8..=255, 0u8..=255, 1u8..=254)
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
    ]
}

fn registry() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        (host(), proptest::option::of(1u16..=65535)).prop_map(|(h, p)| Some(match p {
            Some(p) => format!("{h}:{p}"),
            None => h,
        })),
    ]
}

fn tag() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"
}

fn digest() -> impl Strategy<Value = String> {
    "[a-f0-9]{64}".prop_map(|h| format!("sha256:{h}"))
}

prop_compose! {
    fn reference_string()(
        registry in registry(),
        path in proptest::collection::vec(path_component(), 1..5),
        tag in proptest::option::of(tag()),
        digest in proptest::option::of(digest()),
    ) -> String {
        let mut s = String::new();
        let mut path = path;
        match registry {
            Some(r) => {
                s.push_str(&r);
                s.push('/');
            }
            // Without a registry, a first component with a dot would be read as a host.
            None => path[0] = path[0].replace('.', "-"),
        }
        s.push_str(&path.join("/"));
        if let Some(t) = tag { s.push(':'); s.push_str(&t); }
        if let Some(d) = digest { s.push('@'); s.push_str(&d); }
        s
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn rewrite_then_reverse_is_identity(input in reference_string()) {
        let r = Reference::parse(&input).unwrap();
        let rewritten = r.rewrite(PROXY).unwrap();
        prop_assert!(is_on_proxy(&rewritten, PROXY));
        let back = Reference::from_rewritten(&rewritten, PROXY).unwrap().unwrap();
        prop_assert_eq!(&back, &r);
        // The rewritten image is a valid reference on the proxy's registry.
        let on_proxy = Reference::parse(&rewritten).unwrap();
        prop_assert_eq!(on_proxy.registry(), PROXY);
        prop_assert_eq!(on_proxy.digest(), r.digest());
    }

    #[test]
    fn canonical_form_is_a_fixed_point(input in reference_string()) {
        let r = Reference::parse(&input).unwrap();
        let again = Reference::parse(&r.to_string()).unwrap();
        prop_assert_eq!(&again, &r);
        prop_assert_eq!(again.to_string(), r.to_string());
    }

    #[test]
    fn digests_are_kept(input in reference_string(), d in digest()) {
        let pinned = format!("{}@{d}", input.split('@').next().unwrap_or_default());
        let r = Reference::parse(&pinned).unwrap();
        prop_assert_eq!(r.digest().map(|x| x.to_string()), Some(d.clone()));
        prop_assert!(r.rewrite(PROXY).unwrap().ends_with(&d));
    }

    #[test]
    fn cached_image_names_are_always_dns_labels(input in reference_string()) {
        let name = Reference::parse(&input).unwrap().cached_image_name();
        prop_assert!(is_dns1123_label(&name), "{}", name);
    }

    #[test]
    fn arbitrary_input_never_panics(input in "\\PC{0,80}") {
        let _ = Reference::parse(&input);
        let _ = Reference::from_rewritten(&input, PROXY);
    }

    #[test]
    fn registry_encoding_round_trips(h in host(), port in proptest::option::of(1u16..=65535)) {
        let registry = match port { Some(p) => format!("{}:{p}", h.to_ascii_lowercase()), None => h.to_ascii_lowercase() };
        let encoded = encode_registry(&registry).unwrap();
        prop_assert!(!encoded.contains(':'));
        prop_assert_eq!(decode_registry(&encoded).unwrap(), registry);
    }
}
