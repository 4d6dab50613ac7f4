"""evrecorder: records RingCentral Engage Voice call streams into stereo WAV files."""

__version__ = "0.1.0"
