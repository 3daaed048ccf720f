//! Start-up checks that explain, in plain words, what the kernel will not let pgprism do and
//! how to change it: io_uring disabled by sysctl, and a locked-memory limit too low for the
//! buffers io_uring registers.

/// `kernel.io_uring_disabled`: 0 allowed, 1 only for the `kernel.io_uring_group`, 2 disabled.
pub(super) fn io_uring_problem() -> Option<String> {
    let value = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    match value.trim() {
        "0" | "" => None,
        "1" => Some(
            "io_uring is restricted (kernel.io_uring_disabled = 1): run pgprism as a member of \
             the group in kernel.io_uring_group, or set `sysctl kernel.io_uring_disabled=0`"
                .into(),
        ),
        other => Some(format!(
            "io_uring is disabled (kernel.io_uring_disabled = {other}); pgprism needs it: \
             set `sysctl kernel.io_uring_disabled=0` (and persist it in /etc/sysctl.d)"
        )),
    }
}

/// Soft RLIMIT_MEMLOCK in bytes, `None` when unlimited.
pub(super) fn memlock_bytes() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; failure leaves it zeroed.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(limit.rlim_cur)
}

/// A warning when the shards' io_uring rings would not fit the memlock limit (kernels that
/// account ring memory to RLIMIT_MEMLOCK refuse to create a ring past it).
pub(super) fn memlock_problem(shards: usize, ring_bytes: usize) -> Option<String> {
    let limit = memlock_bytes()?;
    let needed = (shards * ring_bytes) as u64;
    (needed > limit).then(|| {
        format!(
            "locked-memory limit is {} KiB but {shards} shard(s) want {} KiB for their io_uring \
             rings; on kernels that count ring memory against it, shards fail to start. Raise \
             it with `ulimit -l unlimited` or LimitMEMLOCK=infinity in the systemd unit",
            limit / 1024,
            needed / 1024
        )
    })
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (as PgBouncer and most servers do: each
/// client costs a descriptor, each backend connection another, and the default soft limit of
/// 1024 would make `accept` fail with EMFILE near 500 proxied clients). Returns a warning
/// when even the hard limit is below what `sessions` clients need.
pub(super) fn raise_open_files(sessions: u64) -> Option<String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    let needed = sessions.saturating_mul(2).saturating_add(64);
    (limit.rlim_cur != libc::RLIM_INFINITY && limit.rlim_cur < needed).then(|| {
        format!(
            "open files limit is {} (hard limit): about {} client sessions fit (each needs a \
             descriptor and a server connection); raise LimitNOFILE / ulimit -n",
            limit.rlim_cur,
            limit.rlim_cur.saturating_sub(64) / 2
        )
    })
}
