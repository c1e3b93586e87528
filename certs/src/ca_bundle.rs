//! Publishing the CA bundle in a MutatingWebhookConfiguration.
//!
//! One JSON patch for all webhook entries whose `caBundle` differs. Each `add` is preceded by a
//! `test` of the entry's name at that index, so if someone reorders the entries between our read
//! and our write, the apiserver rejects the patch instead of us writing into the wrong entry.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, TestOperation};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;

/// The patch that sets every entry's `clientConfig.caBundle` to `ca_bundle_pem`, or `None` when
/// all entries already have it (or there are none).
pub fn patch(config: &MutatingWebhookConfiguration, ca_bundle_pem: &str) -> Option<Patch> {
    let wanted = ByteString(ca_bundle_pem.as_bytes().to_vec());
    // caBundle is bytes: base64 on the wire, which ByteString's serializer produces. It
    // serializes to a JSON string and cannot fail; if it ever did, patching nothing is safe.
    let value = serde_json::to_value(&wanted).ok()?;
    let mut ops = Vec::new();
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref() == Some(&wanted) {
            continue;
        }
        let index = i.to_string();
        ops.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "name"]),
            value: serde_json::Value::String(webhook.name.clone()),
        }));
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", index.as_str(), "clientConfig", "caBundle"]),
            value: value.clone(),
        }));
    }
    (!ops.is_empty()).then_some(Patch(ops))
}

/// True when every entry trusts `ca_bundle_pem` (and there is at least one entry).
pub fn is_published(config: &MutatingWebhookConfiguration, ca_bundle_pem: &str) -> bool {
    config.webhooks.as_ref().is_some_and(|w| !w.is_empty())
        && patch(config, ca_bundle_pem).is_none()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
    use serde_json::json;

    use super::*;

    fn config(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        MutatingWebhookConfiguration {
            webhooks: Some(
                bundles
                    .iter()
                    .enumerate()
                    .map(|(i, b)| MutatingWebhook {
                        name: format!("hook{i}.larder.dev"),
                        client_config: WebhookClientConfig {
                            ca_bundle: b.map(|b| ByteString(b.as_bytes().to_vec())),
                            ..WebhookClientConfig::default()
                        },
                        ..MutatingWebhook::default()
                    })
                    .collect(),
            ),
            ..MutatingWebhookConfiguration::default()
        }
    }

    #[test]
    fn patches_only_entries_that_differ_and_applies_cleanly() {
        let cfg = config(&[Some("NEW"), None, Some("OLD")]);
        let p = patch(&cfg, "NEW").unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!([
                {"op": "test", "path": "/webhooks/1/name", "value": "hook1.larder.dev"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "TkVX"},
                {"op": "test", "path": "/webhooks/2/name", "value": "hook2.larder.dev"},
                {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": "TkVX"},
            ])
        );
        let mut doc = serde_json::to_value(&cfg).unwrap();
        json_patch::patch(&mut doc, &p).unwrap();
        let patched: MutatingWebhookConfiguration = serde_json::from_value(doc).unwrap();
        assert!(is_published(&patched, "NEW"));
        assert!(patch(&patched, "NEW").is_none());
    }

    #[test]
    fn nothing_to_do_without_entries() {
        let empty = MutatingWebhookConfiguration::default();
        assert!(patch(&empty, "NEW").is_none());
        assert!(!is_published(&empty, "NEW"));
    }

    #[test]
    fn reordered_entries_make_the_patch_fail() {
        let cfg = config(&[None, None]);
        let p = patch(&cfg, "NEW").unwrap();
        let mut doc = serde_json::to_value(&cfg).unwrap();
        doc["webhooks"].as_array_mut().unwrap().reverse();
        assert!(json_patch::patch(&mut doc, &p).is_err());
    }
}
