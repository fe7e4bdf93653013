"""The "faiss" k-means backend: one level's k-means on the host CPU, as the authors' `run_hkmeans`.

`faiss.Clustering` with an exact `IndexFlatL2`: subsample to `max_points_per_centroid` points per
centroid, random initialization, `niter` Lloyd iterations, best of `nredo` restarts; then every
point is assigned to its nearest centroid. Results are bit-identical across calls with the same
faiss thread count. Another thread count (`faiss.omp_set_num_threads`) gave the same assignments
and centroids in our checks, but faiss's final squared distances, hence phi, differ in the last
float32 bits (BLAS blocking).

faiss would print "WARNING clustering n points to k centroids" to stderr whenever
n < k * min_points_per_centroid (always the case for upper levels; harmless): it is told 0, and
`hierarchy.hierarchical_kmeans` logs one line naming the under-filled levels instead.
"""

from __future__ import annotations

import faiss
import numpy as np


def kmeans(x, k, *, niter, nredo, seed, max_points_per_centroid, mesh):
    """faiss k-means of x (n, d) float32 -> centroids (k, d), sq_dists (n,), assign (n,) int32.

    sq_dists: each point's squared L2 distance to its centroid. `mesh` is ignored (host only).
    """
    del mesh
    d = x.shape[1]
    clus = faiss.Clustering(d, k)
    clus.niter = niter
    clus.nredo = nredo
    clus.seed = seed
    clus.max_points_per_centroid = max_points_per_centroid
    clus.min_points_per_centroid = 0  # its only use is a stderr warning, logged by the caller
    clus.verbose = False
    index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    sq_dists, assign = index.search(x, 1)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return centroids, sq_dists[:, 0], assign[:, 0].astype(np.int32)
