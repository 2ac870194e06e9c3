//! The local Functions host: a tool beside the product.
