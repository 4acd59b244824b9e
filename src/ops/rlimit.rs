//! Raises the open-file limit: every call is a socket, and the common default soft limit of
//! 1024 would cap a busy daemon (or a benchmark) well below `audiosocket.max_calls`.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn raises_to_at_least_the_old_soft_limit() {
        assert!(super::raise_nofile_limit().unwrap() >= 256);
    }
}
