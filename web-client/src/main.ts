import { createApp } from "vue";
import App from "./App.vue";
import { unlockAudioOnGesture } from "./notify";
import { boot } from "./store";
import "./style.css";

unlockAudioOnGesture();
createApp(App).mount("#app");
void boot();
