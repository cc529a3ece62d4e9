"""hfx's GAN family: DCGAN generator and (projection, spectrally normalised) discriminator, and a
StyleGAN-style generator, diffusers ``ModelMixin`` components of :class:`~hfx.pipelines.GANPipeline`; and
CycleGAN's ResNet generator and PatchGAN discriminator (:class:`~hfx.pipelines.CycleGANPipeline`)."""

from .cyclegan_gan import CycleGANGenerator, ImageToImageOutput, PatchGANDiscriminator, PatchScoresOutput
from .modeling_gan import DCGANDiscriminator, DCGANGenerator, GANDiscriminatorOutput, GANGeneratorOutput
from .stylegan_gan import StyleGANGenerator

#: Generator architecture name (a task option) -> class.
GENERATORS = {"dcgan": DCGANGenerator, "stylegan": StyleGANGenerator}

__all__ = ["GENERATORS", "CycleGANGenerator", "DCGANDiscriminator", "DCGANGenerator", "GANDiscriminatorOutput",
           "GANGeneratorOutput", "ImageToImageOutput", "PatchGANDiscriminator", "PatchScoresOutput", "StyleGANGenerator"]
