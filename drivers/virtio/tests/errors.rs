//! Every public error type of the virtio driver is a `core::error::Error` that can cross
//! threads (`Send + Sync + 'static`), and an error that wraps another names it as its
//! `source()`.

use core::error::Error;

fn is_error<E: Error + Send + Sync + 'static>() {}

#[test]
fn every_public_error_type_is_an_error_that_can_cross_threads() {
    is_error::<virtio::blk::BlkError>();
    is_error::<virtio::dma::PoolError>();
    is_error::<virtio::mmio::ProbeError>();
    is_error::<virtio::pattern::StampError>();
    is_error::<virtio::persist::PersistError>();
    is_error::<virtio::rng::RngError>();
}

#[test]
fn a_wrapping_error_names_the_wrapped_one_as_its_source() {
    let pool = virtio::dma::PoolError::NoMemory(memory::buddy::BuddyError::OutOfMemory);
    let blk = virtio::blk::BlkError::Pool(pool);
    assert_eq!(blk.source().map(ToString::to_string), Some(pool.to_string()));
    assert!(pool.source().is_some(), "the buddy's refusal under the pool's");
    let persist = virtio::persist::PersistError::Blk(blk);
    assert_eq!(persist.source().and_then(Error::source).map(ToString::to_string), Some(pool.to_string()));
}
