//! The WIT bindings, generated once, here. Host functions return
//! `Result<_, HostError>` (`trappable_error_type`): a `?` decides between a
//! value the plugin sees and a trap (see `error`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "kontain:generator/plugin",
    imports: { default: async | trappable },
    exports: { default: async },
    trappable_error_type: {
        "kontain:generator/types.error" => super::error::HostError,
    },
    with: {
        "kontain:generator/images.layer": super::images::LayerHandle,
        "kontain:generator/images.manifest": super::images::ManifestHandle,
        "kontain:generator/images.blob": super::images::BlobHandle,
        "kontain:generator/go.module": crate::go::wit::ModuleHandle,
        "kontain:generator/buildpack.source": crate::buildpack::wit::SourceHandle,
    },
});
