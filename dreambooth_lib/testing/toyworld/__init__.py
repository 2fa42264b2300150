"""The toy world: a text-to-image model trained here from scratch, so DreamBooth can be seen working offline.

`world` (the 32x32 shapes-and-colours generator, captions, labels, the subject the world cannot draw), `train`
(VAE, text encoder and UNet from scratch on one CPU thread; `make toyworld`), `probe` (the attribute classifier
that measures prompt following and stands in for DINO), `evaluators` (the toy CLIP and LPIPS, labelled),
`shipped` (the trained weights in dreambooth_lib/assets/toyworld and their working copies), `ablation` (DreamBooth
with and without prior preservation on it, measured).
"""
