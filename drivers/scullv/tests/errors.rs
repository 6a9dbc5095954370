//! `ScullError` is a `core::error::Error` that can cross threads, and names the vmalloc
//! refusal it wraps as its `source()`.

use core::error::Error;

#[test]
fn the_error_type_is_an_error_that_can_cross_threads_and_names_its_source() {
    fn is_error<E: Error + Send + Sync + 'static>() {}
    is_error::<scullv::ScullError>();
    let inner = memory::vmalloc::VmallocError::NoFrames;
    let e = scullv::ScullError::Quantum(inner);
    assert_eq!(e.source().map(ToString::to_string), Some(inner.to_string()));
    assert!(scullv::ScullError::NoMemory.source().is_none());
}
