"""MatchAnything RoMa, coarse half (roma_full): DINOv2 + VGG19-BN encoder, GP matcher, coordinate decoder.

Public pieces, meant to be reused by roma_plus (which adds the refiners at scales 16..1):

- ``vgg.VGG19Pyramid``: VGG19-BN trunk, ``forward(x) -> {1: B,64,H,W; 2: B,128,H/2; 4: B,256,H/4;
  8: B,512,H/8}``; parameters ``layers.N.*`` (checkpoint ``matcher.model.encoder.cnn.layers.N.*``).
- ``dinov2.DinoV2ViTL14``: ViT-L/14 with the DINOv2 file's own parameter names (``blocks.N.*``,
  ``pos_embed``, ...), ``forward(x) -> B,1024,H/14,W/14`` (normed patch tokens); the 37x37
  position grid is resized to the token grid computed from the input shape (exportable).
- ``encoder.RomaEncoder``: ``cnn`` (VGG19Pyramid) + ``dinov2`` (DinoV2ViTL14);
  ``forward(x) -> {1, 2, 4, 8: VGG levels, 16: DINOv2 tokens at stride 14}``.
  ``encoder.normalize_images(x, imagenet)``: the input normalisation (MatchAnything test mode,
  ``norm_img=False``: identity; images go in as RGB in [0, 1]).
  ``encoder.check_input_size(h, w)``: raises MatchrtError naming the nearest valid sizes.
- ``gp.GaussianProcess`` (checkpoint ``gps.16``): ``kernel_matrices(f_q, f_s) -> (K_xy, K_yy + sigma I,
  basis)``, ``posterior(k_qs, alpha, h, w)``, ``forward(f_q, f_s, solve="exact"|"iterative"|"cg"|
  "newton_schulz", iters=None)``; module functions ``gp.solve_exact`` (Cholesky, any device),
  ``gp.solve_iterative`` (Newton-Schulz + one refinement step by default, or CG),
  ``gp.newton_schulz_iters(M)``.
- ``decoder.CoordinateDecoder`` (checkpoint ``embedding_decoder``): ``forward(gp_feats, feats) ->
  (gm_cls B,4096,h,w; gm_certainty B,1,h,w)``; ``decoder.classification_to_flow(gm_cls) -> B,2,h,w``.
- ``model.RomaCoarse``: ``encoder``, ``proj16``, ``gp``, ``embedding_decoder``;
  ``pyramids(image0, image1) -> (pyr_q, pyr_s)`` (symmetric batch: q = [A, B], s = [B, A]),
  ``coarse(f_q16, f_s16) -> dict(gm_cls, gm_certainty, flow, certainty, feat_q16, feat_s16)``
  (flow/certainty: coarse prediction before the scale-16 refiner; feat_*16: proj.16 outputs),
  ``forward(image0, image1) -> same dict``.
- ``weights.coarse_rename(source, key) -> str | None``: RomaCoarse key for a checkpoint/DINOv2 tensor
  this half uses (None otherwise); ``weights.rename`` (roma_full's full rename: refiner tensors
  become ``Reserved("roma_plus")``); ``weights.REFINER_PREFIXES``, ``weights.is_refiner_key``.
- ``export``: ``build_plan`` (gp_solve iterative: one graph; exact: encode -> ``bridge`` -> decode),
  modules ``Features``, ``GPSupport``, ``IterativeSolve``, ``GPPosterior``, ``Head``, ``ToWarp``.
- ``ops``: ``stable_softmax``, ``coarse_grid(b, h, w, like) -> B,2,h,w`` (cell centres in [-1, 1], x
  first), ``centre_coords``, ``swap_halves``.
"""
