//! Pure decisions: no I/O.
