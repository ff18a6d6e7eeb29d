//! A loopback TCP proxy that can be cut and restored, to take a network
//! service away from a client and give it back without restarting either.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A running proxy from a loopback port to `target`.
pub struct TcpProxy {
    port: u16,
    target: SocketAddr,
    stopping: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy to `target` on a free loopback port.
    pub fn start(target: SocketAddr) -> Self {
        Self::start_on(0, target)
    }

    /// Starts a proxy to `target` on `port` (0: any free port).
    pub fn start_on(port: u16, target: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stopping = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let stopping = Arc::clone(&stopping);
            let connections = Arc::clone(&connections);
            std::thread::spawn(move || accept_loop(&listener, target, &stopping, &connections))
        };
        Self { port, target, stopping, connections, acceptor: Some(acceptor) }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts the service off: stops listening (new connections are refused)
    /// and resets every open connection. Returns what
    /// [`restore`](Cut::restore) needs to listen on the same port again.
    pub fn cut(mut self) -> Cut {
        self.shutdown();
        Cut { port: self.port, target: self.target }
    }

    fn shutdown(&mut self) {
        let Some(acceptor) = self.acceptor.take() else { return };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor; it sees `stopping` and drops the listener.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        acceptor.join().unwrap();
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A proxy that was cut.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    port: u16,
    target: SocketAddr,
}

impl Cut {
    /// Listens on the same port again.
    pub fn restore(self) -> TcpProxy {
        TcpProxy::start_on(self.port, self.target)
    }
}

fn accept_loop(
    listener: &TcpListener,
    target: SocketAddr,
    stopping: &AtomicBool,
    connections: &Mutex<Vec<TcpStream>>,
) {
    for client in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(upstream) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        if let Err(e) = pipe(client, upstream, connections) {
            eprintln!("tcp proxy: {e}");
        }
    }
}

/// Copies both ways on two threads; registers both sockets for `cut`.
fn pipe(
    client: TcpStream,
    upstream: TcpStream,
    connections: &Mutex<Vec<TcpStream>>,
) -> io::Result<()> {
    {
        let mut connections = connections.lock().unwrap();
        connections.push(client.try_clone()?);
        connections.push(upstream.try_clone()?);
    }
    let (mut client_read, mut client_write) = (client.try_clone()?, client);
    let (mut upstream_read, mut upstream_write) = (upstream.try_clone()?, upstream);
    std::thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = io::copy(&mut upstream_read, &mut client_write);
        let _ = client_write.shutdown(Shutdown::Write);
    });
    Ok(())
}
