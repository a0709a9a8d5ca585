//! Loopback networking: picking free ports and probing servers.
//!
//! Everything here uses 127.0.0.1 and nothing else: the services are for this
//! machine only.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::POLL_INTERVAL;

/// The only address the services listen on.
pub const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Picks `N` distinct free TCP ports on 127.0.0.1.
///
/// Binds port 0 `N` times, keeping every listener open until all ports are
/// known so they differ, then releases them. Another process could take a port
/// before the service binds it; that race is accepted (the service then fails
/// to start and says so).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let mut ports = [0; N];
    let mut listeners = Vec::with_capacity(N);
    for port in &mut ports {
        let listener = TcpListener::bind((HOST, 0))
            .context("failed to bind 127.0.0.1:0 to pick a free port")?;
        *port = listener
            .local_addr()
            .context("failed to read the address of a listener on 127.0.0.1:0")?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((HOST, port)), CONNECT_TIMEOUT).is_ok()
}

/// Whether an HTTP server on 127.0.0.1:`port` answers `GET /` (with any status).
pub fn http_answers(port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::from((HOST, port)), CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut head = [0; 5];
        stream.read_exact(&mut head)?;
        Ok(&head == b"HTTP/")
    };
    probe().unwrap_or(false)
}

/// Calls `ready` every poll interval until it returns `Ok(true)`, fails if it
/// returns an error, and gives up after `timeout` with an error naming `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {}s waiting for {what}", timeout.as_secs());
        }
        thread::sleep(POLL_INTERVAL);
    }
}
