//! A proxy replacing another on the same node (the chart's rolling update with surge): it binds
//! the same port while the old one still serves (SO_REUSEPORT), waits for the old one's disk
//! lock, and takes over; a request sent in between waits instead of being refused.

// Test helpers outside #[test] functions panic on setup failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

async fn start(
    disk: &std::path::Path,
    listen: &str,
    lock_wait: &str,
) -> larder_proxy::RunningProxy {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = larder_proxy::ProxyArgs::from_args([
        "--listen",
        listen,
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        disk.to_str().unwrap(),
        "--disk-lock-wait",
        lock_wait,
    ])
    .unwrap();
    larder_proxy::start(args).await.expect("proxy starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_proxy_takes_over_the_port_and_disk_without_refusing_a_request() {
    let disk = tempfile::tempdir().unwrap();
    let port = larder_testkit::ports::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let old = start(disk.path(), &listen, "0s").await;

    // Without a wait, a second proxy on the same disk is refused at once.
    let refused = {
        let args = larder_proxy::ProxyArgs::from_args([
            "--listen",
            &listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--disk-cache",
            disk.path().to_str().unwrap(),
        ])
        .unwrap();
        larder_proxy::start(args).await
    };
    let Err(err) = refused else {
        panic!("two proxies on one disk directory");
    };
    assert!(
        err.to_string()
            .contains("another process holds the disk tier"),
        "{err}"
    );

    // With a wait, the new one starts beside it and waits.
    let (d, l) = (disk.path().to_owned(), listen.clone());
    let new = tokio::spawn(async move { start(&d, &l, "20s").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !new.is_finished(),
        "the new proxy must wait for the disk lock"
    );

    // The old one goes; requests sent meanwhile are all answered, none refused.
    let url = format!("http://{listen}/v2/");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let asking = tokio::spawn(async move {
        let mut answered = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let r = client.get(&url).send().await.expect("never refused");
            // /v2/ asks for credentials (so clients present theirs): an answer, not a refusal.
            assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answered
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.shutdown(Duration::from_secs(5)).await;
    let new = tokio::time::timeout(Duration::from_secs(20), new)
        .await
        .expect("the new proxy starts once the old one is gone")
        .unwrap();
    let answered = asking.await.unwrap();
    assert!(answered > 10, "only {answered} requests answered");
    new.shutdown(Duration::from_secs(5)).await;
}
