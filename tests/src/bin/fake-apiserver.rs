//! `fake-apiserver`: larder's fake Kubernetes API server as a process, for the end-to-end suite
//! in CI and the controller benchmark. A test double (no validation, admission or RBAC): see
//! `larder_testkit::fake_apiserver`.
//!
//! ```text
//! fake-apiserver --kubeconfig /tmp/fake/kubeconfig [--listen 127.0.0.1:0] [--max-lifetime 2h]
//! ```
//! The kubeconfig is written (atomically) once the server listens; the process serves until
//! SIGTERM, SIGINT or `--max-lifetime`, whichever comes first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use larder_testkit::fake_apiserver::{FakeApiServer, FakeOptions};

#[derive(Parser, Debug)]
#[command(about = "A fake Kubernetes API server for tests (no validation, admission or RBAC)")]
struct Args {
    /// Where to listen (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write the kubeconfig naming this server.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Exit after this long even without a signal (keeps a forgotten process bounded).
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
    max_lifetime: Duration,
    /// Changes kept for watches to resume from.
    #[arg(long, default_value_t = 200_000)]
    history: usize,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!("fake-apiserver: --listen must be a loopback address");
        return std::process::ExitCode::from(2);
    }
    let options = FakeOptions {
        listen: args.listen,
        kubeconfig: Some(args.kubeconfig.clone()),
        history: args.history,
        ..FakeOptions::default()
    };
    let mut server = match FakeApiServer::start(options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-apiserver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "fake-apiserver (a test double: no validation, admission or RBAC) on {}, kubeconfig {}",
        server.url(),
        args.kubeconfig.display()
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fake-apiserver: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
            () = tokio::time::sleep(args.max_lifetime) => {
                eprintln!("fake-apiserver: --max-lifetime reached");
            }
        }
    });
    server.stop();
    std::process::ExitCode::SUCCESS
}
