//! An Azure simulator for local runs and tests.
