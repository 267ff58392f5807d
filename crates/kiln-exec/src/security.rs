//! Docker's default confinement: capability set and seccomp profile, as data both backends use.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::spec::ExecError;

/// Docker's default capabilities: (name, number).
pub(crate) const DEFAULT_CAPS: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_MKNOD", 27),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_SETFCAP", 31),
];

/// Every capability name the kernel knows, by number (for `--security=insecure` under runc).
pub(crate) const ALL_CAP_NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Bit mask of [`DEFAULT_CAPS`] (`0xa80425fb`, what `CapEff` shows in a Docker container).
pub(crate) fn default_cap_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |m, (_, n)| m | (1u64 << n))
}

/// The highest capability number this kernel knows.
pub(crate) fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// The capabilities (permitted set) this process has.
pub(crate) fn current_permitted() -> u64 {
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: valid header and two data structs, as capget v3 expects.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if r != 0 {
        return u64::MAX;
    }
    u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32)
}

/// `capget`/`capset` header, version 3.
#[repr(C)]
pub(crate) struct CapHeader {
    pub version: u32,
    pub pid: i32,
}

/// `capget`/`capset` data; version 3 takes two (capabilities 0–31 and 32–63).
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub(crate) struct CapData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

/// Namespace flags `clone` may not use in the default profile (Docker blocks them without
/// CAP_SYS_ADMIN): NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
pub(crate) const CLONE_NS_FLAGS: u64 = 0x7E02_0000;

/// `personality` values the default profile allows (Docker's list).
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

macro_rules! sys {
    ($($name:ident),* $(,)?) => { &[$((stringify!($name), libc::$name as i64)),*] };
}

/// Syscalls Docker's default profile allows unconditionally (x86_64 and aarch64 share these;
/// the 32-bit-only names of Docker's list do not exist here). Left out on purpose, as Docker
/// does without extra capabilities: mount, umount2, pivot_root, unshare, setns, keyctl,
/// add_key, request_key, bpf, perf_event_open, open_by_handle_at, kexec_*, init_module,
/// finit_module, delete_module, reboot, swapon/swapoff, acct, settimeofday, clock_settime,
/// quotactl, lookup_dcookie, userfaultfd, fanotify_init, io_uring_*, and (as Docker on kernels
/// before 4.8) ptrace, process_vm_readv/writev.
const COMMON_SYSCALLS: &[(&str, i64)] = sys![
    SYS_accept,
    SYS_accept4,
    SYS_adjtimex,
    SYS_bind,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_chroot,
    SYS_clock_adjtime,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_copy_file_range,
    SYS_dup,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fanotify_mark,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchmodat2,
    SYS_fchown,
    SYS_fchownat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_flistxattr,
    SYS_flock,
    SYS_fremovexattr,
    SYS_fsetxattr,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_futex_waitv,
    SYS_getcpu,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getitimer,
    SYS_getpeername,
    SYS_getpgid,
    SYS_getpid,
    SYS_getppid,
    SYS_getpriority,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_getrlimit,
    SYS_get_robust_list,
    SYS_getrusage,
    SYS_getsid,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_inotify_add_watch,
    SYS_inotify_init1,
    SYS_inotify_rm_watch,
    SYS_io_cancel,
    SYS_ioctl,
    SYS_io_destroy,
    SYS_io_getevents,
    SYS_ioprio_get,
    SYS_ioprio_set,
    SYS_io_setup,
    SYS_io_submit,
    SYS_kill,
    SYS_landlock_add_rule,
    SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self,
    SYS_lgetxattr,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_lseek,
    SYS_lsetxattr,
    SYS_madvise,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_memfd_secret,
    SYS_mincore,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_mlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_mmap,
    SYS_mprotect,
    SYS_mq_getsetattr,
    SYS_mq_notify,
    SYS_mq_open,
    SYS_mq_timedreceive,
    SYS_mq_timedsend,
    SYS_mq_unlink,
    SYS_mremap,
    SYS_msgctl,
    SYS_msgget,
    SYS_msgrcv,
    SYS_msgsnd,
    SYS_msync,
    SYS_munlock,
    SYS_munlockall,
    SYS_munmap,
    SYS_name_to_handle_at,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_openat2,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_pkey_mprotect,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_process_mrelease,
    SYS_pselect6,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readahead,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_remap_file_pages,
    SYS_removexattr,
    SYS_renameat,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigpending,
    SYS_rt_sigprocmask,
    SYS_rt_sigqueueinfo,
    SYS_rt_sigreturn,
    SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_sched_getaffinity,
    SYS_sched_getattr,
    SYS_sched_getparam,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_getscheduler,
    SYS_sched_rr_get_interval,
    SYS_sched_setaffinity,
    SYS_sched_setattr,
    SYS_sched_setparam,
    SYS_sched_setscheduler,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_semctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_setfsgid,
    SYS_setfsuid,
    SYS_setgid,
    SYS_setgroups,
    SYS_setitimer,
    SYS_setpgid,
    SYS_setpriority,
    SYS_setregid,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setreuid,
    SYS_setrlimit,
    SYS_set_robust_list,
    SYS_setsid,
    SYS_setsockopt,
    SYS_set_tid_address,
    SYS_setuid,
    SYS_setxattr,
    SYS_shmat,
    SYS_shmctl,
    SYS_shmdt,
    SYS_shmget,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_signalfd4,
    SYS_socket,
    SYS_socketpair,
    SYS_splice,
    SYS_statfs,
    SYS_statx,
    SYS_symlinkat,
    SYS_sync,
    SYS_sync_file_range,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_tee,
    SYS_tgkill,
    SYS_timer_create,
    SYS_timer_delete,
    SYS_timer_getoverrun,
    SYS_timer_gettime,
    SYS_timer_settime,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_times,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_uname,
    SYS_unlinkat,
    SYS_utimensat,
    SYS_vmsplice,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// The legacy x86_64 syscalls of Docker's list.
#[cfg(target_arch = "x86_64")]
const ARCH_SYSCALLS: &[(&str, i64)] = sys![
    SYS_access,
    SYS_alarm,
    SYS_arch_prctl,
    SYS_chmod,
    SYS_chown,
    SYS_creat,
    SYS_dup2,
    SYS_epoll_create,
    SYS_epoll_ctl_old,
    SYS_epoll_wait,
    SYS_epoll_wait_old,
    SYS_eventfd,
    SYS_fork,
    SYS_futimesat,
    SYS_getdents,
    SYS_getpgrp,
    SYS_get_thread_area,
    SYS_inotify_init,
    SYS_lchown,
    SYS_link,
    SYS_lstat,
    SYS_mkdir,
    SYS_mknod,
    SYS_modify_ldt,
    SYS_open,
    SYS_pause,
    SYS_pipe,
    SYS_poll,
    SYS_readlink,
    SYS_rename,
    SYS_rmdir,
    SYS_select,
    SYS_set_thread_area,
    SYS_signalfd,
    SYS_stat,
    SYS_symlink,
    SYS_time,
    SYS_unlink,
    SYS_utime,
    SYS_utimes,
    SYS_vfork,
];
/// Newer syscalls (x86_64 numbers) that the pinned `libc` has no constant for yet.
#[cfg(target_arch = "x86_64")]
const ARCH_EXTRA: &[(&str, i64)] = &[
    ("io_pgetevents", 333),
    ("cachestat", 451),
    ("map_shadow_stack", 453),
    ("futex_wake", 454),
    ("futex_wait", 455),
    ("futex_requeue", 456),
];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_SYSCALLS: &[(&str, i64)] = &[];
#[cfg(not(target_arch = "x86_64"))]
const ARCH_EXTRA: &[(&str, i64)] = &[];

/// All unconditionally allowed syscalls: (name, number).
pub(crate) fn allowed_syscalls() -> impl Iterator<Item = (&'static str, i64)> {
    COMMON_SYSCALLS
        .iter()
        .chain(ARCH_SYSCALLS)
        .chain(ARCH_EXTRA)
        .map(|(n, nr)| (n.strip_prefix("SYS_").unwrap_or(n), *nr))
}

/// The allowed `personality` values.
pub(crate) fn personalities() -> &'static [u64] {
    PERSONALITIES
}

/// The 32-bit x86 system calls of Docker's default profile that x86_64 has no call of the same
/// name for: large-file and 32-bit-uid variants, the multiplexed `socketcall`/`ipc`, the old
/// signal calls, and the `*_time64` calls of 32-bit `time_t` ABIs.
#[cfg(target_arch = "x86_64")]
const I386_ONLY_SYSCALLS: &[&str] = &[
    "_llseek",
    "_newselect",
    "chown32",
    "clock_adjtime64",
    "clock_getres_time64",
    "clock_gettime64",
    "clock_nanosleep_time64",
    "fadvise64_64",
    "fchown32",
    "fcntl64",
    "fstat64",
    "fstatat64",
    "fstatfs64",
    "ftruncate64",
    "futex_time64",
    "getegid32",
    "geteuid32",
    "getgid32",
    "getgroups32",
    "getresgid32",
    "getresuid32",
    "getuid32",
    "io_pgetevents_time64",
    "ipc",
    "lchown32",
    "lstat64",
    "mmap2",
    "mq_timedreceive_time64",
    "mq_timedsend_time64",
    "ppoll_time64",
    "pselect6_time64",
    "readdir",
    "recvmmsg_time64",
    "rt_sigtimedwait_time64",
    "sched_rr_get_interval_time64",
    "semtimedop_time64",
    "sendfile64",
    "setfsgid32",
    "setfsuid32",
    "setgid32",
    "setgroups32",
    "setregid32",
    "setresgid32",
    "setresuid32",
    "setreuid32",
    "setuid32",
    "sigaction",
    "signal",
    "sigpending",
    "sigprocmask",
    "sigreturn",
    "sigsuspend",
    "socketcall",
    "stat64",
    "statfs64",
    "timer_gettime64",
    "timer_settime64",
    "timerfd_gettime64",
    "timerfd_settime64",
    "truncate64",
    "ugetrlimit",
    "utimensat_time64",
    "waitpid",
];

/// The unconditionally allowed syscalls of a 32-bit x86 process: every name of
/// [`allowed_syscalls`] the i386 ABI has, plus [`I386_ONLY_SYSCALLS`], with i386 numbers.
/// As under Docker on an amd64 host, whose profile is chosen for the host's arch and then
/// applied by name to every arch it lists, amd64-only entries such as `arch_prctl` apply to
/// 32-bit processes too.
#[cfg(target_arch = "x86_64")]
pub(crate) fn allowed_syscalls_i386() -> impl Iterator<Item = (&'static str, i64)> {
    allowed_syscalls()
        .map(|(n, _)| n)
        .chain(I386_ONLY_SYSCALLS.iter().copied())
        .filter_map(|n| crate::syscalls_i386::i386_nr(n).map(|nr| (n, nr)))
}

/// The allowed names that exist only in the 32-bit ABI the profile also covers on this host
/// (i386 on x86_64; none elsewhere), for runtimes that resolve names themselves.
pub(crate) fn compat_only_syscalls() -> &'static [&'static str] {
    #[cfg(target_arch = "x86_64")]
    return I386_ONLY_SYSCALLS;
    #[cfg(not(target_arch = "x86_64"))]
    return &[];
}

fn target_arch() -> Result<seccompiler::TargetArch, ExecError> {
    seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| ExecError::Unsupported("seccomp on this CPU architecture"))
}

/// The numbers the profile's argument rules need, in one ABI.
struct AbiNumbers {
    clone: i64,
    personality: i64,
    clone3: i64,
}

/// The profile's two programs for one ABI (`allowed` numbered in it), each starting with
/// seccompiler's check that the audit arch is `arch`'s.
fn profile_programs(
    allowed: impl Iterator<Item = i64>,
    nr: &AbiNumbers,
    arch: seccompiler::TargetArch,
) -> Result<[BpfProgram; 2], ExecError> {
    let bad =
        |e: seccompiler::BackendError| ExecError::InvalidSpec(format!("seccomp profile: {e}"));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for n in allowed {
        rules.insert(n, Vec::new());
    }
    // clone(flags, ...): flags is argument 0 on x86_64, i386 and aarch64.
    let clone_rule = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(CLONE_NS_FLAGS),
        0,
    )
    .map_err(bad)?])
    .map_err(bad)?;
    rules.insert(nr.clone, vec![clone_rule]);
    let mut pers = Vec::new();
    for p in PERSONALITIES {
        let cond =
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *p).map_err(bad)?;
        pers.push(SeccompRule::new(vec![cond]).map_err(bad)?);
    }
    rules.insert(nr.personality, pers);
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(bad)?;
    let mut clone3 = BTreeMap::new();
    clone3.insert(nr.clone3, Vec::new());
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(bad)?;
    let compile = |f: SeccompFilter| {
        BpfProgram::try_from(f).map_err(|e| ExecError::InvalidSpec(format!("seccomp profile: {e}")))
    };
    Ok([compile(allow)?, compile(clone3)?])
}

/// `AUDIT_ARCH_X86_64` and `AUDIT_ARCH_I386` (`linux/audit.h`).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_I386: u32 = 0x4000_0003;

/// Classic BPF opcodes the arch dispatch uses (`linux/filter.h`).
#[cfg(target_arch = "x86_64")]
mod op {
    pub const LD_W_ABS: u16 = 0x20;
    pub const JA: u16 = 0x05;
    pub const JEQ_K: u16 = 0x15;
    pub const RET_K: u16 = 0x06;
}

/// The instructions of a seccompiler program after its three-instruction arch check
/// (`ld arch; jeq ARCH, 1, 0; ret KILL`), which the dispatch replaces.
#[cfg(target_arch = "x86_64")]
fn body(prog: &BpfProgram) -> Result<&[seccompiler::sock_filter], ExecError> {
    match prog.as_slice() {
        [ld, jeq, ret, rest @ ..]
            if ld.code == op::LD_W_ABS
                && ld.k == 4
                && jeq.code == op::JEQ_K
                && ret.code == op::RET_K =>
        {
            Ok(rest)
        }
        _ => Err(ExecError::InvalidSpec(
            "seccomp profile: unexpected program prologue".into(),
        )),
    }
}

/// One program that runs `x86_64`'s body for x86_64 system calls, `i386`'s for 32-bit x86
/// ones, and kills the process on any other audit arch.
#[cfg(target_arch = "x86_64")]
fn dispatch(x86_64: &BpfProgram, i386: &BpfProgram) -> Result<BpfProgram, ExecError> {
    let insn = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    let native = body(x86_64)?;
    let compat = body(i386)?;
    let skip = u32::try_from(native.len())
        .map_err(|_| ExecError::InvalidSpec("seccomp profile: program too long".into()))?;
    let mut out = Vec::with_capacity(5 + native.len() + compat.len());
    out.push(insn(op::LD_W_ABS, 0, 0, 4));
    out.push(insn(op::JEQ_K, 1, 0, AUDIT_ARCH_X86_64));
    // Not x86_64: past the x86_64 body, with the arch still in the accumulator.
    out.push(insn(op::JA, 0, 0, skip));
    out.extend_from_slice(native);
    out.push(insn(op::JEQ_K, 1, 0, AUDIT_ARCH_I386));
    out.push(insn(op::RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS));
    out.extend_from_slice(compat);
    if out.len() > 4096 {
        return Err(ExecError::InvalidSpec(
            "seccomp profile: program longer than the kernel's 4096 instructions".into(),
        ));
    }
    Ok(out)
}

/// Docker's default seccomp profile as BPF, in install order: the allowlist (default
/// `EPERM`), then a filter making `clone3` fail with `ENOSYS` so libc falls back to `clone`,
/// whose flags the allowlist can inspect. The kernel runs every filter and keeps the
/// strongest action, taking the most recently installed one's errno on a tie.
///
/// On x86_64 each program dispatches on the audit arch, as Docker's profile lists
/// `SCMP_ARCH_X86` beside `SCMP_ARCH_X86_64`: a 32-bit x86 process (a `linux/386` step) gets
/// the same allowlist by name with i386 numbers; any other arch is killed. x32 calls
/// (x86_64 arch, numbers with bit 30 set) match no rule and fail with `EPERM`.
pub(crate) fn default_seccomp_programs() -> Result<Vec<BpfProgram>, ExecError> {
    let arch = target_arch()?;
    let native = AbiNumbers {
        clone: libc::SYS_clone,
        personality: libc::SYS_personality,
        clone3: libc::SYS_clone3,
    };
    let [allow, clone3] = profile_programs(allowed_syscalls().map(|(_, n)| n), &native, arch)?;
    #[cfg(target_arch = "x86_64")]
    {
        use crate::syscalls_i386::i386_nr;
        let missing = || ExecError::InvalidSpec("seccomp profile: i386 table incomplete".into());
        let compat = AbiNumbers {
            clone: i386_nr("clone").ok_or_else(missing)?,
            personality: i386_nr("personality").ok_or_else(missing)?,
            clone3: i386_nr("clone3").ok_or_else(missing)?,
        };
        let [allow32, clone3_32] =
            profile_programs(allowed_syscalls_i386().map(|(_, n)| n), &compat, arch)?;
        Ok(vec![
            dispatch(&allow, &allow32)?,
            dispatch(&clone3, &clone3_32)?,
        ])
    }
    #[cfg(not(target_arch = "x86_64"))]
    Ok(vec![allow, clone3])
}

/// The credentials a RUN step's process ends with, made before the fork (the child must not
/// allocate). Both executors confine their step with [`assume_step_credentials`].
pub(crate) struct StepCredentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    /// setgroups(2) is denied in this user namespace (rootless single-uid mode): skip it.
    pub setgroups_denied: bool,
    /// Drop capabilities, set no_new_privs and load the seccomp programs (not `--privileged`).
    pub sandbox: bool,
    pub cap_keep: u64,
    pub last_cap: u32,
    pub seccomp: Vec<BpfProgram>,
}

impl StepCredentials {
    /// The credentials of a step run as `user`: when `sandbox`, Docker's default capabilities
    /// that kiln itself holds, less those in `cap_drop`, and Docker's default seccomp programs.
    pub(crate) fn new(
        user: &crate::user::ResolvedUser,
        sandbox: bool,
        cap_drop: u64,
    ) -> Result<Self, ExecError> {
        Ok(StepCredentials {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            setgroups_denied: std::fs::read_to_string("/proc/self/setgroups")
                .is_ok_and(|s| s.trim() == "deny"),
            sandbox,
            cap_keep: default_cap_mask() & current_permitted() & !cap_drop,
            last_cap: last_cap(),
            seccomp: if sandbox {
                default_seccomp_programs()?
            } else {
                Vec::new()
            },
        })
    }
}

/// In the forked child, last before exec: when sandboxed, drops every capability outside
/// `cap_keep` from the bounding set, sets the permitted and effective sets to `cap_keep`,
/// clears the ambient set, sets no_new_privs and loads the seccomp programs; then the groups,
/// gid and uid. Raw syscalls only (glibc's wrappers would try to sync threads that only
/// existed in the process the child was forked from), no allocation. Leaving uid 0 without
/// KEEPCAPS clears the permitted and effective sets, as Docker does for non-root users.
///
/// On failure, returns which call failed (0 bounding set, 1 capset, 2 no_new_privs,
/// 3 seccomp, 4 setgroups, 5 setgid, 6 setuid); errno says why.
///
/// # Safety
/// Call only in a freshly forked or cloned child that execs or exits next.
#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "forked-child code: raw syscalls over memory prepared before the fork"
)]
pub(crate) unsafe fn assume_step_credentials(c: &StepCredentials) -> Result<(), u32> {
    if c.sandbox {
        for cap in 0..=c.last_cap {
            if c.cap_keep & (1u64 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(0);
            }
        }
        let hdr = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [
            CapData {
                effective: c.cap_keep as u32,
                permitted: c.cap_keep as u32,
                inheritable: 0,
            },
            CapData {
                effective: (c.cap_keep >> 32) as u32,
                permitted: (c.cap_keep >> 32) as u32,
                inheritable: 0,
            },
        ];
        if libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) != 0 {
            return Err(1);
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(2);
        }
        for prog in &c.seccomp {
            let fprog = libc::sock_fprog {
                len: prog.len() as libc::c_ushort,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog) != 0 {
                return Err(3);
            }
        }
    }
    if !c.setgroups_denied
        && libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0
    {
        return Err(4);
    }
    if libc::syscall(libc::SYS_setgid, c.gid) != 0 {
        return Err(5);
    }
    if libc::syscall(libc::SYS_setuid, c.uid) != 0 {
        return Err(6);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_caps_match_dockers_mask() {
        assert_eq!(default_cap_mask(), 0xa804_25fb);
    }

    #[test]
    fn dangerous_syscalls_are_not_allowed() {
        let allowed: Vec<i64> = allowed_syscalls().map(|(_, n)| n).collect();
        for nr in [
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_kexec_load,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_open_by_handle_at,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_clone3,
        ] {
            assert!(!allowed.contains(&nr), "syscall {nr} must not be allowed");
        }
    }

    /// Runs a classic BPF seccomp program (the opcodes seccompiler and the dispatch emit) on
    /// one system call, as the kernel would: the returned action.
    #[cfg(target_arch = "x86_64")]
    fn run_bpf(prog: &[seccompiler::sock_filter], arch: u32, nr: i64, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&(nr as i32).to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        data[16..24].copy_from_slice(&arg0.to_ne_bytes());
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            let cond = match i.code {
                0x20 => {
                    let k = i.k as usize;
                    a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                    continue;
                }
                0x54 => {
                    a &= i.k;
                    continue;
                }
                0x06 => return i.k,
                0x05 => {
                    pc += i.k as usize;
                    continue;
                }
                0x15 => a == i.k,
                0x25 => a > i.k,
                0x35 => a >= i.k,
                0x45 => a & i.k != 0,
                code => panic!("opcode {code:#x} not interpreted"),
            };
            pc += usize::from(if cond { i.jt } else { i.jf });
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_profile_dispatches_on_the_audit_arch() {
        const ALLOW: u32 = 0x7fff_0000;
        const EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
        const ENOSYS: u32 = 0x0005_0000 | libc::ENOSYS as u32;
        const KILL: u32 = 0x8000_0000;
        const I386: u32 = 0x4000_0003;
        const X86_64: u32 = 0xc000_003e;
        let progs = default_seccomp_programs().unwrap();
        let (allow, clone3) = (&progs[0], &progs[1]);
        let nr = |n: &str| crate::syscalls_i386::i386_nr(n).unwrap();
        // x86_64 keeps its own allowlist.
        assert_eq!(run_bpf(allow, X86_64, libc::SYS_uname, 0), ALLOW);
        assert_eq!(run_bpf(allow, X86_64, libc::SYS_mount, 0), EPERM);
        assert_eq!(
            run_bpf(allow, X86_64, libc::SYS_getpid | 0x4000_0000, 0),
            EPERM
        );
        // i386: the same names with i386 numbers, and the 32-bit-only calls.
        for name in [
            "uname",
            "_llseek",
            "mmap2",
            "fstat64",
            "socketcall",
            "getuid32",
            "set_thread_area",
        ] {
            assert_eq!(run_bpf(allow, I386, nr(name), 0), ALLOW, "{name}");
        }
        for name in ["mount", "umount2", "unshare", "setns", "ptrace", "keyctl"] {
            assert_eq!(run_bpf(allow, I386, nr(name), 0), EPERM, "{name}");
        }
        // 140 is getpriority on x86_64, _llseek on i386: the arch picks the table.
        assert_eq!(nr("_llseek"), 140);
        assert_eq!(run_bpf(allow, I386, nr("clone"), 17), ALLOW);
        assert_eq!(run_bpf(allow, I386, nr("clone"), 0x1000_0011), EPERM);
        assert_eq!(run_bpf(allow, I386, nr("personality"), 8), ALLOW);
        assert_eq!(run_bpf(allow, I386, nr("personality"), 0x0040_0000), EPERM);
        // clone3 fails with ENOSYS in both ABIs; other calls pass the second program.
        assert_eq!(run_bpf(clone3, I386, nr("clone3"), 0), ENOSYS);
        assert_eq!(run_bpf(clone3, X86_64, libc::SYS_clone3, 0), ENOSYS);
        assert_eq!(run_bpf(clone3, I386, nr("uname"), 0), ALLOW);
        // Any other arch is killed by both.
        for prog in [allow, clone3] {
            assert_eq!(run_bpf(prog, 0xc000_00b7, libc::SYS_uname, 0), KILL);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dangerous_syscalls_are_not_allowed_for_i386() {
        let allowed: Vec<&str> = allowed_syscalls_i386().map(|(n, _)| n).collect();
        for name in [
            "keyctl",
            "add_key",
            "request_key",
            "ptrace",
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "kexec_load",
            "bpf",
            "perf_event_open",
            "open_by_handle_at",
            "init_module",
            "finit_module",
            "clone3",
            "stime",
            "ioperm",
            "iopl",
            "vm86",
            "vm86old",
        ] {
            assert!(!allowed.contains(&name), "{name} must not be allowed");
        }
        // Every 32-bit-only name is a real i386 call.
        for name in I386_ONLY_SYSCALLS {
            assert!(crate::syscalls_i386::i386_nr(name).is_some(), "{name}");
        }
    }

    #[test]
    fn profile_compiles() {
        let progs = default_seccomp_programs().unwrap();
        assert_eq!(progs.len(), 2);
        assert!(progs[0].len() > 300);
    }
}
