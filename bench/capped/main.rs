//! `capped-proxy LISTEN UPSTREAM MBPS`: a TCP proxy that paces every connection's bytes towards
//! the client to MBPS MB/s (10^6 bytes/s), for bench/capped.sh.
//!
//! It stands for a registry CDN's per-connection limit. A token bucket with a 10 ms burst paces
//! each connection on its own, whatever the HTTP requests on it; nginx's `limit_rate` is not
//! used because it lets every request send `rate x (elapsed + 1 s)`, a one-second burst per
//! request, which short range requests ride on. Loopback only; stopped by its PID.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Credit a connection may build up while idle (keep-alive between requests).
const BURST: Duration = Duration::from_millis(10);
const BUFFER: usize = 16 << 10;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, mbps] = args.as_slice() else {
        eprintln!("usage: capped-proxy LISTEN UPSTREAM MBPS");
        std::process::exit(2);
    };
    let rate: f64 = match mbps.parse::<f64>() {
        Ok(r) if r > 0.0 => r * 1e6,
        _ => {
            eprintln!("MBPS must be a positive number, not {mbps:?}");
            std::process::exit(2);
        }
    };
    for addr in [listen, upstream] {
        let ip = addr.rsplit_once(':').map_or("", |(h, _)| h);
        if !matches!(ip, "127.0.0.1" | "[::1]" | "localhost") {
            eprintln!("{addr} is not a loopback address");
            std::process::exit(2);
        }
    }
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(client, &upstream, rate).await {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn serve(client: TcpStream, upstream: &str, rate: f64) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        server_write.shutdown().await
    };
    let down = async {
        let mut buf = vec![0u8; BUFFER];
        // When the bytes sent so far are paid for at `rate`.
        let mut paid_until = Instant::now();
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            paid_until = paid_until.max(now - BURST) + Duration::from_secs_f64(n as f64 / rate);
            if paid_until > now {
                tokio::time::sleep_until(paid_until).await;
            }
            client_write.write_all(&buf[..n]).await?;
        }
        client_write.shutdown().await
    };
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}
