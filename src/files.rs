//! The process's open-file limit, and how connections spend it: each client
//! connection holds one file, and a request to the app (or a tunnel) one
//! more while it uses a connection to the app.

/// Open files kept aside for listeners, logs, the engine and the like when
/// sizing the connection limit from the open-file limit.
pub const RESERVED_FILES: usize = 64;

/// Raises the soft open-file limit to the hard limit, so the connection limit
/// can be as large as the system allows. Returns the new soft limit.
pub fn raise_open_file_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or_else(|_| open_file_limit())
}

/// The process's current soft open-file limit.
pub fn open_file_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// How many client connections the open-file limit allows: each holds one
/// descriptor; a proxied request holds a second, to the app, while it runs.
pub fn connection_capacity() -> usize {
    let files = usize::try_from(open_file_limit()).unwrap_or(usize::MAX);
    files.saturating_sub(RESERVED_FILES).max(1)
}

/// The files connections may spend: the open-file limit less the reserve and
/// the app's idle pools (`idle_pool` files, at most a quarter of the rest).
/// A client connection takes one; a proxied request (or tunnel), and a
/// request asking the app about a realtime connection (its auth, refresh or
/// subscribe check), one more while it uses a connection to the app. A
/// realtime connection asks only now and then, so costs one file, not two.
pub fn file_budget(idle_pool: usize) -> usize {
    let files = connection_capacity();
    files.saturating_sub(idle_pool.min(files / 4)).max(2)
}
