//! A loopback TCP proxy that can be cut and restored, to take a network
//! service away from a client and give it back without restarting either,
//! or frozen, to make it go silent (a partition: nothing forwarded, nothing
//! closed).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A running proxy from a loopback port to `target`.
pub struct TcpProxy {
    port: u16,
    target: SocketAddr,
    flags: Arc<Flags>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Flags {
    stopping: AtomicBool,
    frozen: AtomicBool,
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
        let flags = Arc::new(Flags::default());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let flags = Arc::clone(&flags);
            let connections = Arc::clone(&connections);
            std::thread::spawn(move || accept_loop(&listener, target, &flags, &connections))
        };
        Self { port, target, flags, connections, acceptor: Some(acceptor) }
    }

    /// The proxy's loopback address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Makes the service go silent without a word: bytes and closes are
    /// no longer forwarded either way (they are held), every connection
    /// stays open, and new ones are accepted but get nothing through. As a
    /// network partition looks to both ends, until TCP itself gives up.
    pub fn freeze(&self) {
        self.flags.frozen.store(true, Ordering::SeqCst);
    }

    /// Forwards again, starting with what was held.
    pub fn thaw(&self) {
        self.flags.frozen.store(false, Ordering::SeqCst);
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
        self.flags.stopping.store(true, Ordering::SeqCst);
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
    flags: &Arc<Flags>,
    connections: &Mutex<Vec<TcpStream>>,
) {
    for client in listener.incoming() {
        if flags.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(upstream) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        if let Err(e) = pipe(client, upstream, flags, connections) {
            eprintln!("tcp proxy: {e}");
        }
    }
}

/// Copies both ways on two threads; registers both sockets for `cut`.
fn pipe(
    client: TcpStream,
    upstream: TcpStream,
    flags: &Arc<Flags>,
    connections: &Mutex<Vec<TcpStream>>,
) -> io::Result<()> {
    {
        let mut connections = connections.lock().unwrap();
        connections.push(client.try_clone()?);
        connections.push(upstream.try_clone()?);
    }
    let (client_read, client_write) = (client.try_clone()?, client);
    let (upstream_read, upstream_write) = (upstream.try_clone()?, upstream);
    let both = Arc::clone(flags);
    std::thread::spawn(move || forward(client_read, upstream_write, &both));
    let both = Arc::clone(flags);
    std::thread::spawn(move || forward(upstream_read, client_write, &both));
    Ok(())
}

/// Copies `from` to `to`, then passes the end on; while frozen, holds
/// both (until thawed or cut).
fn forward(mut from: TcpStream, mut to: TcpStream, flags: &Flags) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).unwrap_or(0);
        hold_while_frozen(flags);
        if read == 0 || to.write_all(buffer.get(..read).unwrap_or_default()).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn hold_while_frozen(flags: &Flags) {
    while flags.frozen.load(Ordering::SeqCst) && !flags.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
}
