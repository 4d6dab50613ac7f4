from twisted.application.service import ServiceMaker

evrecorder = ServiceMaker(
    "evrecorder",
    "evrecorder.tap",
    "Record Engage Voice call streams into stereo WAV files with JSON sidecars.",
    "evrecorder",
)
