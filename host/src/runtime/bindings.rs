//! The WIT bindings, generated once, here.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "kontain:generator/plugin",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "kontain:generator/images.layer": super::host::LayerHandle,
        "kontain:generator/images.manifest": super::host::ManifestHandle,
        "kontain:generator/images.blob": super::host::BlobHandle,
        "kontain:generator/go.module": super::host::ModuleHandle,
        "kontain:generator/buildpack.source": super::host::SourceHandle,
    },
});
