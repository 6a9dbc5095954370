//! Every public error type of `memory` is a `core::error::Error` that can cross threads and
//! be boxed (`Send + Sync + 'static`), and an error that wraps another names it as its
//! `source()`.

use core::error::Error;

use memory::buddy::BuddyError;
use memory::ioremap::IoremapError;
use memory::kernel::InitError;
use memory::slab::SlabError;
use memory::vmalloc::{MapError, VmallocError};

fn is_error<E: Error + Send + Sync + 'static>() {}

#[test]
fn every_public_error_type_is_an_error_that_can_cross_threads() {
    is_error::<BuddyError>();
    is_error::<SlabError>();
    is_error::<VmallocError>();
    is_error::<MapError>();
    is_error::<IoremapError>();
    is_error::<memory::ioremap::RegsError>();
    is_error::<InitError>();
    is_error::<memory::reclaim::ReclaimError>();
}

fn source_text(e: &dyn Error) -> Option<String> {
    e.source().map(ToString::to_string)
}

#[test]
fn a_wrapping_error_names_the_wrapped_one_as_its_source() {
    let map = MapError::NoMemory;
    assert_eq!(source_text(&VmallocError::MapFailed(map)), Some(map.to_string()));
    assert_eq!(source_text(&IoremapError::MapFailed(map)), Some(map.to_string()));
    assert_eq!(source_text(&IoremapError::Vmalloc(VmallocError::NoFrames)), Some(VmallocError::NoFrames.to_string()));
    let vm = VmallocError::NoVirtualSpace;
    assert_eq!(source_text(&InitError::Vmalloc(vm)), Some(vm.to_string()));
    assert_eq!(source_text(&InitError::Slab(SlabError::OutOfMemory)), Some(SlabError::OutOfMemory.to_string()));
    // The source chain reaches the innermost error.
    let outer = InitError::Vmalloc(VmallocError::MapFailed(map));
    assert_eq!(outer.source().and_then(Error::source).map(ToString::to_string), Some(map.to_string()));
    assert!(InitError::NoKernelSpace.source().is_none());
    assert!(VmallocError::ZeroSize.source().is_none());
}
