//! larder-controllers (being written)
