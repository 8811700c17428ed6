//! The one way the relay takes a std mutex: a panic in another thread while it held the lock does
//! not make every later caller panic too (the data behind these locks stays consistent step by
//! step, so going on is safer than taking the whole relay down).

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
