//! Every public error type of `hal` is a `core::error::Error` that can cross threads and
//! be boxed (`Send + Sync + 'static`), and an error that wraps another names it as its
//! `source()`.

use core::error::Error;

fn is_error<E: Error + Send + Sync + 'static>() {}

#[test]
fn every_public_error_type_is_an_error_that_can_cross_threads() {
    is_error::<hal::addr::AddrError>();
    is_error::<hal::cmdline::ParamError>();
    is_error::<hal::dtb::DtbError>();
    is_error::<hal::el2::NoStub>();
    is_error::<hal::irq::IrqError>();
    is_error::<hal::mmu::MmuError>();
    is_error::<hal::psci::PsciError>();
    is_error::<hal::smp::CallError>();
    is_error::<hal::smp::SmpError>();
}

#[test]
fn a_wrapping_error_names_the_wrapped_one_as_its_source() {
    let inner = hal::addr::AddrError::Overflow;
    let e = hal::mmu::MmuError::Addr(inner);
    assert_eq!(e.source().map(ToString::to_string), Some(inner.to_string()));
    let leaf = hal::mmu::MmuError::ExecutableDevice;
    assert!(leaf.source().is_none());
}
