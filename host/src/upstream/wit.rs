//! The `upstream` interface, host side: manifests and blobs of other
//! registries, through the generator's own registry list and byte budget.

use super::Upstream;
use crate::generator::ErrorKind;
use crate::runtime::host::wit::upstream;
use crate::runtime::host::{
    BlobHandle, Ctx, Getter, Has, HostError, HostResult, HostState, Linker, ManifestHandle,
    Resource, Trap,
};

pub fn add_to_linker(linker: &mut Linker<HostState>, get: Getter<Upstream>) -> Trap<()> {
    upstream::add_to_linker::<HostState, Has<Upstream>>(linker, get)
}

impl upstream::Host for Ctx<'_, Upstream> {
    async fn fetch_manifest(
        &mut self,
        image: String,
        reference: String,
        accept: Vec<String>,
    ) -> HostResult<Resource<ManifestHandle>> {
        let scoped = self
            .service
            .scoped(self.call.generator(), self.call.upstreams());
        let manifest = scoped.manifest(&image, &reference, &accept).await?;
        self.push(ManifestHandle(manifest))
    }

    async fn list_tags(&mut self, image: String) -> HostResult<Vec<String>> {
        let scoped = self
            .service
            .scoped(self.call.generator(), self.call.upstreams());
        Ok(scoped.tags(&image).await?.to_vec())
    }

    async fn referrers(
        &mut self,
        image: String,
        digest: String,
    ) -> HostResult<Vec<upstream::Referrer>> {
        let scoped = self
            .service
            .scoped(self.call.generator(), self.call.upstreams());
        let found = scoped.referrers(&image, &digest).await?;
        Ok(found
            .iter()
            .map(crate::runtime::host::referrer_of)
            .collect())
    }

    async fn fetch_blob(
        &mut self,
        image: String,
        digest: String,
    ) -> HostResult<Resource<BlobHandle>> {
        let scoped = self
            .service
            .scoped(self.call.generator(), self.call.upstreams());
        scoped.check(&image)?;
        if self.call.budget() == 0 {
            return Err(HostError::guest(
                ErrorKind::LimitExceeded,
                format!(
                    "this request has produced {} bytes, the generator's limit",
                    self.call.limit()
                ),
            ));
        }
        let blob = scoped.streamed_blob(&image, &digest).await?;
        if !self.call.produce(blob.size) {
            return Err(HostError::guest(
                ErrorKind::LimitExceeded,
                format!(
                    "blob {digest} takes this request past the generator's limit of {} bytes",
                    self.call.limit()
                ),
            ));
        }
        self.push(BlobHandle(blob))
    }
}
