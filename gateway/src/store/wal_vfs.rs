//! Fewer, larger writes into the WAL: a SQLite VFS shim over the default one.
//!
//! SQLite appends a commit to the WAL one frame at a time, each frame as two `pwrite`s
//! (its 24-byte header, then the page). A batch of telemetry from a hundred devices dirties
//! a couple of index pages per device, so each commit cost some 600 system calls before its
//! `fsync` (counted with `strace` at full load); they were most of the writer thread's
//! kernel time. This shim gathers a WAL file's consecutive writes in memory and hands them
//! to the file in writes of up to 124 KiB.
//!
//! What SQLite can observe stays as it was:
//! - a commit's frames are all written to the file (the OS) before the `xWrite` of the
//!   commit frame's page returns: that page is the last write of a commit, and everything
//!   gathered goes out with it. Only then does SQLite sync the WAL (`synchronous=FULL`) and
//!   publish the commit to readers in the shared index, so readers, a crash (`kill -9`)
//!   and a sync all find the same bytes as without the shim, and a failed write fails the
//!   commit as before;
//! - anything gathered is written out before the WAL is read, synced, truncated, measured
//!   or closed, and before a write that does not continue it; the first write after any
//!   of those is not gathered (see [`wal_write`]);
//! - every other file (the database, its shared-memory index, journals) is passed through,
//!   and only the write connection uses this VFS.
//!
//! It also opens a second descriptor to each WAL file, when SQLite opens it ([`WalSync`]):
//! the batching writer commits without syncing and syncs through it on a thread of its own,
//! so that it writes the next batch while the last one syncs.
//!
//! Frames of a transaction that is not committing yet (a cache spill) may reach the file
//! later than SQLite wrote them, at the latest with the commit frame; nothing reads them
//! before, and a transaction rolled back leaves them unused, as before.
#![allow(unsafe_code)]
// SAFETY (the whole module): SQLite calls these functions with the `sqlite3_file` it
// allocated with this VFS's `szOsFile` bytes, so every such pointer is a `File`, whose
// `inner` part the default VFS opened; it never calls a file's methods concurrently (one
// connection uses a file at a time, and a file belongs to one connection), so the
// `Gathered` of a WAL file is only ever touched by one thread at a time.

use std::ffi::{c_int, c_void, CStr};
use std::mem::offset_of;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock};

use rusqlite::ffi;

/// The name to open a connection with (`SqliteConnectOptions::vfs`).
pub const NAME: &str = "gateway-wal-gather";
const NAME_C: &CStr = c"gateway-wal-gather";

/// Gathered bytes past this are written out even mid-transaction (a large one spilling
/// its cache), so memory stays bounded.
const MAX_GATHERED: usize = 8 << 20;
/// The most the default (unix) VFS writes in one call: it masks a write's length to 17 bits.
const MAX_WRITE: usize = 124 << 10;
/// The size of a WAL frame header: a write of exactly this size is one.
const FRAME_HEADER: c_int = 24;

/// Registers the VFS (once per process); false if SQLite has no default VFS to wrap.
pub fn register() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| unsafe {
        let inner = ffi::sqlite3_vfs_find(ptr::null());
        if inner.is_null() {
            return false;
        }
        let mut vfs = *inner;
        vfs.pNext = ptr::null_mut();
        vfs.zName = NAME_C.as_ptr();
        vfs.szOsFile = (offset_of!(File, inner) as c_int) + (*inner).szOsFile;
        vfs.xOpen = Some(open);
        // The other methods are the default VFS's, called with this struct: they find
        // what they need in `pAppData`, copied from it (the unix VFS uses none of it).
        INNER.get_or_init(|| Inner(inner));
        ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 0) == ffi::SQLITE_OK
    })
}

/// The default VFS this one wraps.
struct Inner(*mut ffi::sqlite3_vfs);
// SAFETY: a registered VFS is immutable and lives as long as the process.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}
static INNER: OnceLock<Inner> = OnceLock::new();

/// What SQLite allocates per open file: our header, then the default VFS's file.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    /// A WAL file's gathered writes; null for every other file.
    gathered: *mut Gathered,
    /// The default VFS's file; it extends past the struct (its `szOsFile` bytes).
    inner: ffi::sqlite3_file,
}

/// Consecutive writes not yet handed to the file.
struct Gathered {
    /// File offset of `bytes[0]`.
    at: i64,
    bytes: Vec<u8>,
    /// The last write was a commit frame's header: its page is written out at once too.
    commit_page_next: bool,
    /// The last operation on the file was a write (see [`wal_write`]).
    writing: bool,
    /// The file's own descriptor for syncing it from another thread (`None` if it could
    /// not be opened).
    sync: Option<Arc<WalSync>>,
}

/// A descriptor of its own to a WAL file, opened by path right after SQLite opened the
/// file (so the same file), and kept while SQLite keeps its own.
///
/// [`WalSync::sync`] makes durable every byte written to the WAL before it is called, as
/// SQLite's own sync of the WAL at a commit does (`fsync`: SQLite is built without
/// `fdatasync`). It shares nothing with SQLite's file, so another thread may call it
/// while SQLite writes: what it syncs is the file, whichever descriptor wrote to it. The
/// WAL takes no POSIX locks, so opening and closing a descriptor to it disturbs none.
#[derive(Debug)]
pub struct WalSync {
    file: std::fs::File,
    path: PathBuf,
    /// The directory to sync at the first sync, as SQLite does for a WAL it opened to
    /// create (the file's name must be durable too); `None` once done.
    dir: Mutex<Option<PathBuf>>,
}

impl WalSync {
    fn open(path: &Path, create: bool) -> Option<WalSync> {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .open(path)
            .ok()?;
        let dir = create
            .then(|| path.parent().map(Path::to_path_buf))
            .flatten();
        Some(WalSync {
            file,
            path: path.to_path_buf(),
            dir: Mutex::new(dir),
        })
    }

    /// Syncs the WAL file (and, the first time, its directory).
    pub fn sync(&self) -> std::io::Result<()> {
        #[cfg(test)]
        tests::wait_at_gate(&self.path)?;
        self.file.sync_all()?;
        let mut dir = self.dir.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = dir.as_ref() {
            std::fs::File::open(path)?.sync_all()?;
            *dir = None;
        }
        Ok(())
    }

    /// The WAL file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The [`WalSync`] of a WAL file SQLite opened through this VFS; `None` for a file this VFS
/// did not open, or whose own descriptor could not be opened.
///
/// # Safety
/// `file` is an open file of SQLite's (such as its `SQLITE_FCNTL_JOURNAL_POINTER`), not in
/// use on another thread.
pub unsafe fn sync_handle(file: *mut ffi::sqlite3_file) -> Option<Arc<WalSync>> {
    if !ptr::eq((*file).pMethods, &WAL) {
        return None;
    }
    gathered(file).sync.clone()
}

unsafe fn inner(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    ptr::addr_of_mut!((*file.cast::<File>()).inner)
}

unsafe fn methods<'a>(inner: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    &*(*inner).pMethods
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let outer = file.cast::<File>();
    (*outer).base.pMethods = ptr::null();
    (*outer).gathered = ptr::null_mut();
    let vfs = INNER.get().expect("registered before use").0;
    let open = (*vfs).xOpen.expect("a VFS can open files");
    let rc = open(vfs, name, inner(file), flags, out_flags);
    // With no methods set, SQLite does not close the file: nothing to wrap.
    if (*inner(file)).pMethods.is_null() {
        return rc;
    }
    if flags & ffi::SQLITE_OPEN_WAL != 0 {
        let sync = (rc == ffi::SQLITE_OK && !name.is_null())
            .then(|| {
                let path = Path::new(std::ffi::OsStr::from_bytes(CStr::from_ptr(name).to_bytes()));
                WalSync::open(path, flags & ffi::SQLITE_OPEN_CREATE != 0)
            })
            .flatten()
            .map(Arc::new);
        (*outer).gathered = Box::into_raw(Box::new(Gathered {
            at: 0,
            bytes: Vec::new(),
            commit_page_next: false,
            writing: false,
            sync,
        }));
        (*outer).base.pMethods = &WAL;
    } else {
        (*outer).base.pMethods = &PASS;
    }
    rc
}

/// [`MAX_GATHERED`], or a test's own limit.
fn max_gathered() -> usize {
    #[cfg(test)]
    if let Some(max) = tests::TEST_MAX_GATHERED.get() {
        return max;
    }
    MAX_GATHERED
}

/// The gathered writes of a WAL file (opened by [`open`], so they exist).
unsafe fn gathered<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Gathered {
    &mut *(*file.cast::<File>()).gathered
}

/// Writes out what a WAL file gathered.
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    let g = gathered(file);
    if g.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    let mut rc = ffi::SQLITE_OK;
    let mut at = g.at;
    for chunk in g.bytes.chunks(MAX_WRITE) {
        rc = pass_write(file, chunk.as_ptr().cast(), chunk.len() as c_int, at);
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += chunk.len() as i64;
    }
    // Written or failed, it is not written again: a failed commit is SQLite's to undo.
    g.bytes.clear();
    rc
}

/// Before any operation on a WAL file but a write: what was gathered is written out, and
/// the next write is written through.
unsafe fn settle(file: *mut ffi::sqlite3_file) -> c_int {
    let rc = flush(file);
    let g = gathered(file);
    g.writing = false;
    g.commit_page_next = false;
    rc
}

unsafe extern "C" fn wal_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    let bytes = std::slice::from_raw_parts(data.cast::<u8>(), amount.max(0) as usize);
    // A frame header carries, at bytes 4..8, the database size after a commit (0 if none).
    let commit_header = amount == FRAME_HEADER && bytes[4..8] != [0, 0, 0, 0];
    let g = gathered(file);
    // The page after a commit frame's header ends the commit: everything goes out with it.
    let commit_complete = std::mem::replace(&mut g.commit_page_next, commit_header);
    if !g.writing {
        // The first write after another operation goes straight to the file. When SQLite
        // rewrites the checksums of a commit's frames, it reads each frame and writes its
        // header back, the commit frame's last: nothing follows that would write it out.
        g.writing = true;
        return pass_write(file, data, amount, offset);
    }
    if !g.bytes.is_empty() && offset != g.at + g.bytes.len() as i64 {
        let rc = flush(file);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if g.bytes.is_empty() {
        g.at = offset;
    }
    g.bytes.extend_from_slice(bytes);
    if commit_complete || g.bytes.len() >= max_gathered() {
        return flush(file);
    }
    ffi::SQLITE_OK
}

/// Forwards to the default VFS's method, after a WAL file's gathered writes for those that
/// depend on them.
macro_rules! forward {
    ($name:ident, $method:ident ( $($arg:ident : $ty:ty),* ) -> $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            let inner = inner(file);
            match methods(inner).$method {
                Some(f) => f(inner $(, $arg)*),
                None => $missing,
            }
        }
    };
    ($name:ident, $wal:ident, $method:ident ( $($arg:ident : $ty:ty),* ) -> $missing:expr) => {
        forward!($name, $method($($arg: $ty),*) -> $missing);
        unsafe extern "C" fn $wal(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            let rc = settle(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            $name(file $(, $arg)*)
        }
    };
}

forward!(pass_read, wal_read, xRead(data: *mut c_void, amount: c_int, offset: i64) -> ffi::SQLITE_IOERR_READ);
forward!(pass_write, xWrite(data: *const c_void, amount: c_int, offset: i64) -> ffi::SQLITE_IOERR_WRITE);
forward!(pass_truncate, wal_truncate, xTruncate(size: i64) -> ffi::SQLITE_IOERR_TRUNCATE);
forward!(pass_sync, wal_sync, xSync(flags: c_int) -> ffi::SQLITE_IOERR_FSYNC);
forward!(pass_file_size, wal_file_size, xFileSize(size: *mut i64) -> ffi::SQLITE_IOERR_FSTAT);
forward!(pass_lock, wal_lock, xLock(level: c_int) -> ffi::SQLITE_OK);
forward!(pass_unlock, wal_unlock, xUnlock(level: c_int) -> ffi::SQLITE_OK);
forward!(pass_check_reserved, wal_check_reserved, xCheckReservedLock(out: *mut c_int) -> ffi::SQLITE_OK);
forward!(pass_file_control, wal_file_control, xFileControl(op: c_int, arg: *mut c_void) -> ffi::SQLITE_NOTFOUND);
forward!(pass_shm_map, wal_shm_map, xShmMap(region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> ffi::SQLITE_IOERR_SHMMAP);
forward!(pass_shm_lock, wal_shm_lock, xShmLock(offset: c_int, n: c_int, flags: c_int) -> ffi::SQLITE_IOERR_SHMLOCK);
forward!(pass_shm_unmap, wal_shm_unmap, xShmUnmap(delete: c_int) -> ffi::SQLITE_OK);
forward!(pass_unfetch, wal_unfetch, xUnfetch(offset: i64, page: *mut c_void) -> ffi::SQLITE_OK);

unsafe extern "C" fn pass_fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    let inner = inner(file);
    match methods(inner).xFetch {
        Some(f) => f(inner, offset, amount, out),
        None => {
            *out = ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn pass_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    let inner = inner(file);
    methods(inner).xSectorSize.map_or(4096, |f| f(inner))
}

unsafe extern "C" fn pass_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    let inner = inner(file);
    methods(inner)
        .xDeviceCharacteristics
        .map_or(0, |f| f(inner))
}

unsafe extern "C" fn pass_shm_barrier(file: *mut ffi::sqlite3_file) {
    let inner = inner(file);
    if let Some(f) = methods(inner).xShmBarrier {
        f(inner)
    }
}

unsafe extern "C" fn pass_close(file: *mut ffi::sqlite3_file) -> c_int {
    let inner = inner(file);
    methods(inner).xClose.map_or(ffi::SQLITE_OK, |f| f(inner))
}

unsafe extern "C" fn wal_close(file: *mut ffi::sqlite3_file) -> c_int {
    let flushed = settle(file);
    let outer = file.cast::<File>();
    drop(Box::from_raw((*outer).gathered));
    (*outer).gathered = ptr::null_mut();
    let closed = pass_close(file);
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

static PASS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(pass_close),
    xRead: Some(pass_read),
    xWrite: Some(pass_write),
    xTruncate: Some(pass_truncate),
    xSync: Some(pass_sync),
    xFileSize: Some(pass_file_size),
    xLock: Some(pass_lock),
    xUnlock: Some(pass_unlock),
    xCheckReservedLock: Some(pass_check_reserved),
    xFileControl: Some(pass_file_control),
    xSectorSize: Some(pass_sector_size),
    xDeviceCharacteristics: Some(pass_device_characteristics),
    xShmMap: Some(pass_shm_map),
    xShmLock: Some(pass_shm_lock),
    xShmBarrier: Some(pass_shm_barrier),
    xShmUnmap: Some(pass_shm_unmap),
    xFetch: Some(pass_fetch),
    xUnfetch: Some(pass_unfetch),
};

static WAL: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(wal_close),
    xRead: Some(wal_read),
    xWrite: Some(wal_write),
    xTruncate: Some(wal_truncate),
    xSync: Some(wal_sync),
    xFileSize: Some(wal_file_size),
    xLock: Some(wal_lock),
    xUnlock: Some(wal_unlock),
    xCheckReservedLock: Some(wal_check_reserved),
    xFileControl: Some(wal_file_control),
    xSectorSize: Some(pass_sector_size),
    xDeviceCharacteristics: Some(pass_device_characteristics),
    xShmMap: Some(wal_shm_map),
    xShmLock: Some(wal_shm_lock),
    xShmBarrier: Some(pass_shm_barrier),
    xShmUnmap: Some(wal_shm_unmap),
    xFetch: Some(pass_fetch),
    xUnfetch: Some(wal_unfetch),
};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};
    use std::cell::Cell;
    use std::path::Path;

    thread_local! {
        /// This thread's limit on gathered bytes, instead of [`MAX_GATHERED`] (SQLite calls
        /// the VFS on the thread that steps the statement).
        pub(super) static TEST_MAX_GATHERED: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// A gate on the syncs of one WAL file ([`WalSync::sync`]): it lets a number of them
    /// through and holds the rest until told otherwise; it can fail the next one.
    #[derive(Default)]
    pub(crate) struct SyncGate {
        state: Mutex<GateState>,
        changed: std::sync::Condvar,
    }

    #[derive(Default)]
    struct GateState {
        /// How many syncs may pass (`None`: all).
        passes: Option<u32>,
        fail_next: bool,
        arrived: u32,
    }

    impl SyncGate {
        /// A gate for the WAL file at `wal` that holds every sync (tests run side by side:
        /// one file each).
        pub(crate) fn close(wal: &Path) -> Arc<SyncGate> {
            let gate = Arc::new(SyncGate::default());
            gate.state.lock().unwrap().passes = Some(0);
            GATES
                .lock()
                .unwrap()
                .push((wal.to_path_buf(), gate.clone()));
            gate
        }

        /// How many syncs have reached the gate.
        pub(crate) fn arrived(&self) -> u32 {
            self.state.lock().unwrap().arrived
        }

        /// Lets the first `passes` syncs through, and holds the rest.
        pub(crate) fn pass(&self, passes: u32) {
            self.state.lock().unwrap().passes = Some(passes);
            self.changed.notify_all();
        }

        /// Lets every sync through, the next one to fail if `fail`.
        pub(crate) fn open(&self, fail: bool) {
            let mut state = self.state.lock().unwrap();
            state.passes = None;
            state.fail_next = fail;
            self.changed.notify_all();
        }
    }

    static GATES: Mutex<Vec<(PathBuf, Arc<SyncGate>)>> = Mutex::new(Vec::new());

    pub(super) fn wait_at_gate(path: &Path) -> std::io::Result<()> {
        let gate = GATES
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, g)| g.clone());
        let Some(gate) = gate else { return Ok(()) };
        let mut state = gate.state.lock().unwrap();
        state.arrived += 1;
        let number = state.arrived;
        while state.passes.is_some_and(|passes| number > passes) {
            state = gate.changed.wait(state).unwrap();
        }
        // A failing gate fails one sync: the next may succeed, as after a real failure.
        match std::mem::take(&mut state.fail_next) {
            true => Err(std::io::Error::other("a failing sync gate")),
            false => Ok(()),
        }
    }

    /// The WAL's own descriptor is to the WAL file SQLite writes (the same file, not only
    /// the same name), and syncs it.
    #[test]
    fn the_wal_has_a_descriptor_of_its_own_to_sync_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = writer(&path, "NORMAL", 2000);
        insert(&db, 0, 10, 10);
        // SAFETY: the pointer is SQLite's open WAL file, used on this thread only.
        let sync = unsafe { sync_handle(open_file(&db, ffi::SQLITE_FCNTL_JOURNAL_POINTER)) }
            .expect("the WAL's own descriptor");
        let wal_path = dir.path().join("t.db-wal");
        assert_eq!(sync.path(), wal_path);
        let (ours, file) = (
            sync.file.metadata().unwrap(),
            std::fs::metadata(&wal_path).unwrap(),
        );
        assert_eq!((ours.dev(), ours.ino()), (file.dev(), file.ino()));
        assert!(ours.len() > 0, "the commit is in the file it syncs");
        sync.sync().unwrap();
        assert!(
            sync.dir.lock().unwrap().is_none(),
            "its directory synced once"
        );
        // A file this VFS did not open as a WAL has none: the database file itself.
        // SAFETY: as above, the database file.
        assert!(unsafe { sync_handle(open_file(&db, ffi::SQLITE_FCNTL_FILE_POINTER)) }.is_none());
    }

    /// One of `db`'s open files: `op` is `SQLITE_FCNTL_FILE_POINTER` or `_JOURNAL_POINTER`.
    fn open_file(db: &Connection, op: c_int) -> *mut ffi::sqlite3_file {
        let mut file: *mut ffi::sqlite3_file = ptr::null_mut();
        // SAFETY: an open handle; the call writes the file's pointer to `file`.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                db.handle(),
                c"main".as_ptr(),
                op,
                ptr::addr_of_mut!(file).cast(),
            )
        };
        assert_eq!(rc, ffi::SQLITE_OK);
        assert!(!file.is_null());
        file
    }

    /// A connection through this VFS, in WAL mode at `synchronous`, that never checkpoints
    /// by itself (so every commit stays in the WAL) and caches only `cache_pages` pages.
    fn writer(path: &Path, synchronous: &str, cache_pages: u32) -> Connection {
        assert!(register());
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let db = Connection::open_with_flags_and_vfs(path, flags, NAME).unwrap();
        db.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
             PRAGMA wal_autocheckpoint = 0; PRAGMA cache_size = {cache_pages};
             CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);
             CREATE INDEX t_v ON t (v);"
        ))
        .unwrap();
        db
    }

    /// What a crash (`kill -9`) would leave: the files as the OS has them now, copied while
    /// the writer still holds them open, then opened without this VFS.
    fn after_a_crash(path: &Path) -> (i64, String) {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy.db");
        std::fs::copy(path, &copy).unwrap();
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::copy(&wal, dir.path().join("copy.db-wal")).unwrap();
        let db = Connection::open(&copy).unwrap();
        let rows = db
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        let check = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        (rows, check)
    }

    fn insert(db: &Connection, from: i64, rows: i64, bytes: usize) {
        let tx = db.unchecked_transaction().unwrap();
        for k in from..from + rows {
            // Values in no particular order: the index's pages are dirtied all over.
            let v = format!(
                "{:08x}{}",
                (k * 2_654_435_761) % 4_294_967_291,
                "x".repeat(bytes)
            );
            tx.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", (k, v))
                .unwrap();
        }
        tx.commit().unwrap();
    }

    /// Each commit is in the WAL file, whole, when it returns, and a reader (not using this
    /// VFS) sees it at once: at `synchronous=NORMAL`, where SQLite never syncs a commit, as
    /// at `FULL`; and when the limit on gathered bytes is reached anywhere in a commit (three
    /// frames and a header: right after some commit frame's header, in some commits).
    #[test]
    fn a_commit_is_in_the_file_and_visible_when_it_returns() {
        // A frame is a 4096-byte page (SQLite's default) after its header.
        let frame = 4096 + FRAME_HEADER as usize;
        for limit in [None, Some(3 * frame + FRAME_HEADER as usize)] {
            TEST_MAX_GATHERED.set(limit);
            for synchronous in ["FULL", "NORMAL"] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("t.db");
                let db = writer(&path, synchronous, 2000);
                let reader = Connection::open(&path).unwrap();
                for batch in 0..40 {
                    insert(&db, batch * 25, 25, 100 + 40 * (batch as usize % 5));
                    let seen: i64 = reader
                        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                        .unwrap();
                    let why = format!("{synchronous}, limit {limit:?}, commit {batch}");
                    assert_eq!(seen, (batch + 1) * 25, "{why}: a reader sees it");
                    assert_eq!(
                        after_a_crash(&path),
                        ((batch + 1) * 25, "ok".to_string()),
                        "{why}: it survives a crash"
                    );
                }
            }
        }
    }

    /// A transaction larger than the cache writes frames before its commit and then writes
    /// some pages again, in place (SQLite then rewrites the frames' checksums as it
    /// commits); one larger than what is gathered at once and than one write of the
    /// default VFS goes out in parts. Both commit, survive a crash, and check clean.
    #[test]
    fn transactions_that_spill_rewrite_or_outgrow_the_buffer_commit_whole() {
        for synchronous in ["FULL", "NORMAL"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t.db");
            let db = writer(&path, synchronous, 8);
            insert(&db, 0, 500, 200);
            {
                let tx = db.unchecked_transaction().unwrap();
                for round in 0..4 {
                    tx.execute(
                        "UPDATE t SET v = v || ?1 WHERE k % 7 = ?2",
                        (round.to_string(), round),
                    )
                    .unwrap();
                }
                tx.commit().unwrap();
            }
            assert_eq!(after_a_crash(&path), (500, "ok".into()), "{synchronous}");
            // 12 MB in one commit, with the cache at 2000 pages.
            db.execute_batch("PRAGMA cache_size = 2000").unwrap();
            insert(&db, 1000, 3000, 4000);
            assert_eq!(after_a_crash(&path), (3500, "ok".into()), "{synchronous}");
            let updated: i64 = db
                .query_row(
                    "SELECT count(*) FROM t WHERE k < 500 AND k % 7 < 4 AND length(v) > 208",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(updated, (0..500).filter(|k| k % 7 < 4).count() as i64);
        }
    }
}
