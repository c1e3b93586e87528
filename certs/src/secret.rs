//! The self-managed material as a Kubernetes Secret.
//!
//! Type `kubernetes.io/tls`, so `tls.crt`/`tls.key` mean what every tool expects; `ca.crt` holds
//! the trust bundle and `ca.key` the current CA's key. The CA key lives beside the serving key
//! because whoever can read one can already impersonate the webhook with the other.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;

use crate::Material;

/// Key of the trust bundle (current CA first).
pub const CA_CERT: &str = "ca.crt";
/// Key of the current CA's private key.
pub const CA_KEY: &str = "ca.key";
/// Key of the serving certificate.
pub const TLS_CERT: &str = "tls.crt";
/// Key of the serving certificate's private key.
pub const TLS_KEY: &str = "tls.key";
/// Secret type: the standard TLS Secret.
pub const SECRET_TYPE: &str = "kubernetes.io/tls";

/// The material stored in `secret`, or `None` when a key is missing or not UTF-8 (which the
/// caller treats like no material at all: start over).
pub fn material_from(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(Material {
        ca_bundle_pem: text(CA_CERT)?,
        ca_key_pem: text(CA_KEY)?,
        cert_pem: text(TLS_CERT)?,
        key_pem: text(TLS_KEY)?,
    })
}

/// The Secret to write for `material`. With `previous`, its metadata (resourceVersion
/// included, so a concurrent writer makes our replace fail instead of being overwritten) and
/// unrelated data keys are kept.
pub fn secret_for(
    name: &str,
    namespace: &str,
    material: &Material,
    previous: Option<&Secret>,
) -> Secret {
    let mut secret = previous.cloned().unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    });
    secret
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("app.kubernetes.io/managed-by".into(), "larder".into());
    secret.type_ = Some(SECRET_TYPE.to_owned());
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    for (key, value) in [
        (CA_CERT, &material.ca_bundle_pem),
        (CA_KEY, &material.ca_key_pem),
        (TLS_CERT, &material.cert_pem),
        (TLS_KEY, &material.key_pem),
    ] {
        data.insert(key.to_owned(), ByteString(value.clone().into_bytes()));
    }
    secret.string_data = None;
    secret
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material() -> Material {
        Material {
            ca_bundle_pem: "ca".into(),
            ca_key_pem: "ca key".into(),
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        }
    }

    #[test]
    fn round_trip() {
        let secret = secret_for("s", "ns", &material(), None);
        assert_eq!(secret.metadata.name.as_deref(), Some("s"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(secret.type_.as_deref(), Some(SECRET_TYPE));
        assert_eq!(material_from(&secret), Some(material()));
    }

    #[test]
    fn replace_keeps_resource_version_and_foreign_keys() {
        let mut previous = secret_for("s", "ns", &material(), None);
        previous.metadata.resource_version = Some("42".into());
        previous
            .data
            .as_mut()
            .unwrap()
            .insert("extra".into(), ByteString(b"x".to_vec()));
        let next = Material {
            cert_pem: "new cert".into(),
            ..material()
        };
        let secret = secret_for("s", "ns", &next, Some(&previous));
        assert_eq!(secret.metadata.resource_version.as_deref(), Some("42"));
        assert!(secret.data.as_ref().unwrap().contains_key("extra"));
        assert_eq!(material_from(&secret), Some(next));
    }

    #[test]
    fn incomplete_or_binary_secrets_hold_no_material() {
        let mut secret = secret_for("s", "ns", &material(), None);
        secret.data.as_mut().unwrap().remove(TLS_KEY);
        assert_eq!(material_from(&secret), None);

        let mut secret = secret_for("s", "ns", &material(), None);
        secret
            .data
            .as_mut()
            .unwrap()
            .insert(CA_KEY.into(), ByteString(vec![0xff, 0xfe]));
        assert_eq!(material_from(&secret), None);
        assert_eq!(material_from(&Secret::default()), None);
    }
}
